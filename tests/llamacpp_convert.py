"""llama.cpp's own converter (convert_hf_to_gguf.py, vendored in the llama-cpp-python sdist), to make GGUFs of tiny
models exactly as users' GGUFs are made.  Fetched once from PyPI (the sdist of the installed llama-cpp-python) by the
GGUF export benchmark's own helper (bench/gguf_vs_llamacpp.py ``peer_converter``, cached under bench/.data); the tiny
models get SmolLM2's tokenizer, which the converter recognises ("smollm")."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from gguf_vs_llamacpp import peer_converter  # bench/ is on sys.path (tests/conftest.py)


def convert(hf_dir: Path, out: Path, outtype: str = "f32") -> Path:
    """``hf_dir`` -> ``out`` with llama.cpp's converter (its own gguf-py first on the path)."""
    script = peer_converter()
    env = {**os.environ, "PYTHONPATH": str(script.parent / "gguf-py"), "NO_LOCAL_GGUF": ""}
    p = subprocess.run([sys.executable, str(script), str(hf_dir), "--outfile", str(out), "--outtype", outtype],
                       capture_output=True, text=True, env=env)
    if p.returncode != 0:
        raise RuntimeError(f"convert_hf_to_gguf.py failed on {hf_dir}:\n{p.stderr[-3000:]}")
    return out
