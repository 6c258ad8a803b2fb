"""Shared helpers for benchmarks: run a callable or command in a child process and report wall time and peak RSS."""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time


def run_child(code: str, *args: str) -> dict:
    """Run `python -c code args...` and return {"wall_s", "peak_rss_mb", "stdout"}; the child's own peak RSS."""
    t = time.perf_counter()
    p = subprocess.run([sys.executable, "-c", _WRAP + code, *args], capture_output=True, text=True,
                       env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    wall = time.perf_counter() - t
    if p.returncode:
        raise RuntimeError(f"benchmark child failed:\n{p.stderr[-3000:]}")
    last = p.stdout.strip().splitlines()[-1]
    info = json.loads(last)
    info.setdefault("wall_s", wall)
    return info


def run_command(cmd: list[str], cwd: str | None = None, env: dict | None = None) -> dict:
    """Run an external command; wall time and the peak RSS of the largest child it waited for."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    t = time.perf_counter()
    p = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t
    if p.returncode:
        raise RuntimeError(f"{cmd[0]} failed:\n{p.stderr[-3000:]}")
    after = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return {"wall_s": wall, "peak_rss_mb": max(after, before) / 1024, "stdout": p.stdout}


_WRAP = """
import json as _json, resource as _res, time as _time, atexit as _atexit
_t0 = _time.perf_counter()
"""


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
