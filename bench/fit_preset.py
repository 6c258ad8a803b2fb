"""A fitted output's factors as a preset file a recipe bakes as given (``method: factors, options: {long: FILE}``).

``dprope extend ... --method dprope-fit`` writes its factors report (``dprope_factors.json``) into the output; this
keeps what a preset needs from it: the factors and the temperature, the provenance sentence the fit wrote with the
date, the machine, the torch build and the command added (the ``factors`` method carries a file's ``provenance``
into the factors report and the model card), and the fit's summary and trace (the loss per step or per candidate).

    python bench/fit_preset.py out/smollm2-135m-16384-fit bench/results/fit/dprope-fit-16384-cpu.json \\
        --command "make fit-smollm2 FIT_TARGET=16384"
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
from pathlib import Path

KEEP = ("pick", "best_step", "fitness", "evals", "stopped", "elapsed", "fitness_spec", "tokens_per_step",
        "seconds_per_eval", "init", "config", "kind", "processes", "device")


def machine() -> str:
    import os

    import torch

    return (f"{os.cpu_count()}-core {platform.machine()} CPU" if not torch.cuda.is_available()
            else torch.cuda.get_device_name(0)) + f", torch {torch.__version__}"


def preset(report: dict, command: str, when: str | None = None) -> dict:
    """The preset of a factors report (``dprope_factors.json``) of a fitted output."""
    p = report.get("params") or {}
    s = p.get("search") or {}
    if report.get("method") != "dprope-fit" or not s:
        raise SystemExit(f"not a dprope-fit output's report (method {report.get('method')!r})")
    when = when or datetime.date.today().isoformat()
    prov = (p.get("provenance") or "dprope-fit") + f"; {when}, {machine()} float32; `{command}`"
    return {"factors": [float(x) for x in report["factors"]], "temperature": float(report["temperature"]),
            "provenance": prov, "method": "dprope-fit", "target_length": int(p["target_length"]),
            "original_length": int(p["original_length"]), "fit": {k: s.get(k) for k in KEEP if k in s},
            "trace": s.get("trace") or []}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("output", type=Path, help="the fitted output (a directory holding dprope_factors.json)")
    ap.add_argument("preset", type=Path, help="the preset file to write")
    ap.add_argument("--command", required=True, help="the command that made the output, for the provenance")
    ap.add_argument("--date", help="the fit's date (default: today)")
    a = ap.parse_args(argv)
    src = a.output / "dprope_factors.json"
    if not src.is_file():
        raise SystemExit(f"{src} does not exist: give the output directory of a dprope-fit run")
    out = preset(json.loads(src.read_text()), a.command, a.date)
    a.preset.parent.mkdir(parents=True, exist_ok=True)
    a.preset.write_text(json.dumps(out, indent=1) + "\n")
    print(f"{a.preset}: {len(out['factors'])} factors, temperature {out['temperature']:.4f}")
    print(out["provenance"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
