"""Factor sets scored by the short-window objective on text the fit never read: a quick check on a CPU.

``dprope-fit`` with ``window=W`` descends the next-token loss of W-token windows whose chunks carry PoSE's skipped
position ids (Zhu et al., ICLR 2024, arXiv 2309.10400; convert/evaluate/fit.py).  Before a full-length comparison
(bench/quality.py: minutes per 32k window per method here), this script asks the same objective, forward only and on
the same windows for every set, how the fitted factors compare with the others on held-out text: the first
``--head`` tokens of Python's docs (the fit of `make fit-smollm2` skips them: ``skip=65536``) and the licence texts
of /usr/share/common-licenses (never used for choosing anything).  It is the objective whose ranking
bench/short_window_rank.py measured against full-length perplexity (within one temperature, Spearman 0.78-0.98 on
SmolLM2 8k -> 16k), not full-length perplexity itself.

    python bench/short_window_heldout.py --target 32768 --methods none,yarn,dprope,\\
        factors:long=bench/results/train-quality/longrope-search-32768-h100.json:temperature=longrope,\\
        factors:long=out/smollm2-135m-32768-fit/dprope_factors.json:temperature=longrope

Writes short-window-heldout-<target>-w<W>-c<N>[-span].md / .json into --out.
"""

from __future__ import annotations

import argparse
import datetime
import logging
import math
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

import quality  # noqa: E402
import short_window_rank  # noqa: E402

log = logging.getLogger("bench.short_window_heldout")


def pydoc_head(tok, n_tokens: int, cache: Path) -> Path:
    """Python's docs text up to its ``n_tokens``-th token (the part a fit with ``skip=n_tokens`` never reads)."""
    from convert.evaluate.tasks.ppl import corpus_text

    ids = tok(corpus_text(None), add_special_tokens=False).input_ids[:n_tokens]
    path = cache / "corpora" / f"pydoc-head-{n_tokens}.txt"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(tok.decode(ids), encoding="utf-8")
    return path


def measure(args) -> dict:
    from tqdm.auto import tqdm

    from dprope.freqs import RopeContext
    from dprope.methods import run_method

    from convert.evaluate.fit import ShortWindowObjective, resolve_device
    from convert.evaluate.fitness import load_model
    from convert.formats.checkpoint import open_source, resolve_source

    cache = Path(args.cache) if args.cache else quality.cache_root()
    src = open_source(resolve_source(args.source))
    spec, T = src.spec, int(args.target)
    model, tok = load_model(src.path, args.dtype, resolve_device(args.device))
    ctx = RopeContext(spec.inv_freq, spec.rope_theta, spec.original_length, T)
    sets = []
    for m in quality.split_methods(args.methods):
        name, opts = quality.parse_spec(m)
        if name == "none":
            sets.append({"spec": m, "factors": [1.0] * ctx.n_pairs, "temperature": 1.0})
            continue
        r = run_method(name, ctx, **opts)
        sets.append({"spec": m, "factors": [float(x) for x in r.factors.tolist()], "temperature": r.temperature})
    corpora = {"pydoc-head": str(pydoc_head(tok, args.head, cache)),
               "licenses": quality.corpus_path("licenses", cache)}
    out = {"source": args.source, "original": spec.original_length, "target": T, "window": args.window,
           "chunks": args.chunks, "samples": args.samples, "seed": args.seed, "head": args.head,
           "weights": args.weights, "corpora": {}}
    for cname, corpus in corpora.items():
        objective = ShortWindowObjective(model, tok, spec, T, {"window": args.window, "chunks": args.chunks,
                                                                "samples": args.samples, "seed": args.seed,
                                                                "corpus": corpus, "loss_chunk": 1024,
                                                                "weights": args.weights})
        rows = []
        for s in tqdm(sets, desc=f"held-out {cname}", unit="set", dynamic_ncols=True):
            t0 = time.perf_counter()
            v = objective(s["factors"], s["temperature"])
            rows.append({**s, "value": v, "ppl": math.exp(v), "scored": objective.scored[-1],
                         "seconds": round(time.perf_counter() - t0, 1)})
        out["corpora"][cname] = {"objective": objective.label(), "windows": len(objective.loss.windows),
                                 "rows": rows}
    out["machine"] = short_window_rank.machine(model)
    out["date"] = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    return out


def markdown(rep: dict, command: str) -> str:
    lines = [f"Command: `{command}`", "", f"Date: {rep['date']}; machine: {rep['machine']}.", "",
             f"SmolLM2-135M {rep['original']} -> {rep['target']}: the short-window objective (the next-token loss of "
             f"the targets at positions >= {rep['original']} in {rep['samples']} windows of {rep['window']} tokens, "
             f"{rep['chunks']} chunks with PoSE's skipped position ids"
             + (", distant chunks weighted by the positions they stand for (weights=span)" if rep.get("weights") else "")
             + f", seed {rep['seed']}; the same windows for every "
             f"set) on text no fit read: pydoc's first {rep['head']} tokens and the licence texts. Lower is better; "
             "each set at its own temperature.", ""]
    for cname, c in rep["corpora"].items():
        yarn = next((r for r in c["rows"] if r["spec"] == "yarn"), None)
        lines += [f"### `{cname}` ({c['windows']} windows in the pool; {c['rows'][0]['scored']} tokens scored)", "",
                  "| set | temperature | objective (nats) | exp | vs yarn |", "|---|---|---|---|---|"]
        for r in c["rows"]:
            vs = f"{r['ppl'] / yarn['ppl']:.3f}x" if yarn else "-"
            lines.append(f"| {r['spec']} | {r['temperature']:.4f} | {r['value']:.5f} | {r['ppl']:.3f} | {vs} |")
        lines.append("")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--source", default=quality.DEFAULT_SOURCE)
    ap.add_argument("--target", type=int, default=32768)
    ap.add_argument("--methods", default="none,yarn,dprope")
    ap.add_argument("--window", type=int, default=2048)
    ap.add_argument("--chunks", type=int, default=2)
    ap.add_argument("--samples", type=int, default=4, help="windows per corpus")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--weights", choices=["span"], help="span: distant chunks weighted by the positions they stand "
                    "for (the fit's weights=span)")
    ap.add_argument("--head", type=int, default=65536, help="pydoc's tokens held out of the fit")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--cache")
    ap.add_argument("--out", default=str(HERE / "results"))
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    from _measure import run_report

    return run_report(measure, args, argv, "short_window_heldout.py", Path(args.out),
                      f"short-window-heldout-{args.target}-w{args.window}-c{args.chunks}"
                      + (f"-{args.weights}" if args.weights else ""), markdown)


if __name__ == "__main__":
    sys.exit(main())
