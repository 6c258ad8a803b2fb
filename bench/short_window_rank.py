"""Does the fit's short-window objective rank factor sets the way full-length perplexity does?

``dprope-fit`` with ``window=W`` (convert/evaluate/fit.py) scores a factor set on W-token windows whose chunks carry
PoSE's skipped position ids (Zhu et al., ICLR 2024, arXiv 2309.10400; github.com/dwzhu-pku/PoSE
``src/train_pose.py``): relative distances up to the target length for the cost of a W-token pass.  It is only a
useful objective if it orders factor sets as full-length perplexity does, so this script evaluates it, forward only
(``convert.evaluate.fit.ShortWindowObjective``: the same windows and position ids for every set), on the factor sets
bench/search_proxy.py measured at full length (bench/results/search_proxy.json: each set's factors, temperature,
perplexity over the whole window and past the original window) and reports Spearman's rho and Kendall's tau against
both.

A short window cannot show attention spread over the target length's tokens, which is what a temperature
compensates, so ``--temperature-mode fixed`` evaluates every set at one temperature (LongRoPE's by default) to rank
the factors alone; ``as-is`` uses each set's own.

    python bench/short_window_rank.py                                     # SmolLM2-135M, 8k -> 16k, W=2048, 2 chunks
    python bench/short_window_rank.py --temperature-mode fixed            # the factors' ranking alone
    python bench/short_window_rank.py --sets none,yarn,dprope --samples 2 # a few sets, a quick look

Each set's value is stored as soon as it is computed (keyed by the base's content, the objective's settings, the
factors and the temperature) in a JSON beside the report, so an interrupted run resumes and a re-run is instant.
Writes short-window-rank-<target>-w<W>-c<N>[-fixed].md / .json into --out.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import logging
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

import quality  # noqa: E402
import search_proxy  # noqa: E402

log = logging.getLogger("bench.short_window_rank")
CACHE_VERSION = 1
RESULTS = HERE / "results" / "search_proxy.json"


# ------------------------------------------------------------------------------------------- the sets
def load_sets(path: Path, only: str | None = None) -> tuple[dict, list[dict]]:
    """(the full-length results, their sets that carry a perplexity), filtered by ``only`` (comma-separated spec
    names, in the file's order)."""
    rep = json.loads(Path(path).read_text())
    sets = [s for s in rep["sets"] if s.get("ppl") is not None and s.get("ppl_past") is not None]
    if only:
        want = [w.strip() for w in only.split(",") if w.strip()]
        unknown = [w for w in want if w not in {s["spec"] for s in sets}]
        if unknown:
            raise SystemExit(f"--sets: no set {', '.join(unknown)} in {path}; its sets: "
                             + ", ".join(s["spec"] for s in sets))
        sets = [s for s in sets if s["spec"] in want]
    return rep, sets


def rank_report(rows: list[dict], key: str = "value") -> dict:
    """Spearman and Kendall (scipy.stats, via bench/search_proxy.py) of ``key`` against the full-length perplexity
    past the original window and over the whole window, over the rows that have all three; the best set by each."""
    both = [r for r in rows if r.get(key) is not None]
    xs = [r[key] for r in both]
    return {"past the original window": search_proxy._correlations(xs, [r["ppl_past"] for r in both]),
            "whole window": search_proxy._correlations(xs, [r["ppl"] for r in both]),
            "best by the objective": min(both, key=lambda r: r[key])["spec"] if both else None,
            "best by ppl past the window": min(both, key=lambda r: r["ppl_past"])["spec"] if both else None,
            "best by ppl": min(both, key=lambda r: r["ppl"])["spec"] if both else None,
            "by temperature": by_temperature(both, key)}


def by_temperature(rows: list[dict], key: str = "value") -> dict:
    """The ranking within each group of sets that share a temperature (rounded to 4 digits), against perplexity past
    the window, with groups of >= 3 sets, and their size-weighted mean Spearman: what the objective can say about
    factors at one temperature, which is what a fit with a fixed temperature asks of it.  The same for the search's
    sparse-position proxy (bench/search_proxy.py's `proxy`, stored with the sets) where the sets carry it."""
    groups: dict[float, list[dict]] = {}
    for r in rows:
        t = r.get("set_temperature", r.get("temperature"))
        if t is None:
            continue
        groups.setdefault(round(float(t), 4), []).append(r)
    out: dict = {"groups": []}
    for name, get in (("objective", lambda r: r.get(key)), ("proxy", lambda r: (r.get("proxy") or {}).get("proxy"))):
        weighted, total = 0.0, 0
        for t, g in sorted(groups.items()):
            g = [r for r in g if get(r) is not None]
            if len(g) < 3:
                continue
            c = search_proxy._correlations([get(r) for r in g], [r["ppl_past"] for r in g])
            if name == "objective":
                out["groups"].append({"temperature": t, "n": c["n"], "spearman": c["spearman"],
                                      "kendall": c["kendall"], "sets": [r["spec"] for r in g]})
            else:
                for e in out["groups"]:
                    if e["temperature"] == t:
                        e["proxy_spearman"] = c["spearman"]
            if c["spearman"] is not None:
                weighted += c["spearman"] * c["n"]
                total += c["n"]
        out[f"{name}_weighted_spearman"] = weighted / total if total else None
        out[f"{name}_sets"] = total
    return out


def stem(args) -> str:
    return args.name or (f"short-window-rank-{args.target}-w{args.window}-c{args.chunks}"
                         + ("-fixed" if args.temperature_mode == "fixed" else ""))


# ------------------------------------------------------------------------------------------- the measurement
def _key(src_hash: str, identity: dict, factors, temperature: float) -> str:
    return hashlib.sha256(json.dumps([CACHE_VERSION, src_hash, identity, [round(float(f), 6) for f in factors],
                                      round(float(temperature), 9)], sort_keys=True, default=str).encode()
                          ).hexdigest()[:20]


def machine(model) -> str:
    from convert.evaluate.fit import describe_device

    import torch

    where = describe_device(model)
    cpu = platform.processor() or platform.machine()
    return (f"{where}, {os.cpu_count()} CPUs ({cpu}), torch {torch.__version__} with {torch.get_num_threads()} "
            f"threads, {platform.system()} {platform.release()}")


def measure(args) -> dict:
    from tqdm.auto import tqdm

    from dprope.registry import temperature as temperature_of

    from convert.evaluate.engine import model_hash
    from convert.evaluate.fit import ShortWindowObjective, resolve_device
    from convert.evaluate.fitness import load_model
    from convert.formats.checkpoint import open_source, resolve_source
    from convert.io.files import write_atomic

    full, sets = load_sets(Path(args.results), args.sets)
    source = args.source or full.get("source") or quality.DEFAULT_SOURCE
    T = int(args.target or full["target"])
    args.target = T
    corpus_name = args.corpus or full.get("corpus") or "pydoc"
    cache = Path(args.cache) if args.cache else quality.cache_root()
    corpus = quality.corpus_path(corpus_name, cache)
    src = open_source(resolve_source(str(source)))
    original = int(args.original_length or full.get("original") or src.spec.original_length)
    spec = src.spec if original == src.spec.original_length else src.spec.with_window(original)
    scale = T / spec.original_length
    fixed_t = temperature_of(args.temperature, scale, spec.original_length) \
        if args.temperature_mode == "fixed" else None
    src_hash = model_hash(src.path)
    device = resolve_device(args.device)
    log.info("loading %s (%s, %s)", src.path, device, args.dtype)
    model, tok = load_model(src.path, args.dtype, device)
    options = {"window": args.window, "chunks": args.chunks, "samples": args.samples, "seed": args.seed,
               "corpus": corpus, "steps": args.steps, "loss_chunk": args.loss_chunk}
    objective = ShortWindowObjective(model, tok, spec, T, options)
    identity = objective.identity()
    cache_file = Path(args.out) / f"{stem(args)}.cache.json"
    store = json.loads(cache_file.read_text()) if cache_file.exists() else {}

    rows = []
    for s in tqdm(sets, desc=f"short window W={args.window} N={args.chunks}", unit="set", dynamic_ncols=True):
        t = fixed_t if fixed_t is not None else float(s["temperature"])
        key = _key(src_hash, identity, s["factors"], t)
        rec = store.get(key)
        if rec is None and args.cached_only:
            log.warning("not yet measured (skipped with --cached-only): %s", s["spec"])
        elif rec is None:
            t0 = time.perf_counter()
            value = objective(s["factors"], t)
            rec = {"set": s["spec"], "value": value, "temperature": t, "seconds": round(time.perf_counter() - t0, 3),
                   "scored": objective.scored[-1]}
            store[key] = rec
            write_atomic(cache_file, json.dumps(store, indent=1, sort_keys=True) + "\n")
        rows.append({"spec": s["spec"], "kind": s.get("kind", "method"), "set_temperature": float(s["temperature"]),
                     "temperature": t, "ppl": float(s["ppl"]), "ppl_past": float(s["ppl_past"]),
                     "value": None if rec is None else rec["value"],
                     "short_ppl": None if rec is None else math.exp(rec["value"]),
                     "seconds": None if rec is None else rec["seconds"],
                     "scored": None if rec is None else rec.get("scored"), "proxy": s.get("proxy")})
    secs = [r["seconds"] for r in rows if r["seconds"]]
    scored = [r["scored"] for r in rows if r["scored"]]
    per_eval = objective.tokens_per_call()
    return {"results": str(args.results), "source": str(source), "original": spec.original_length, "target": T,
            "corpus": corpus_name, "window": args.window, "chunks": args.chunks, "samples": args.samples,
            "steps": args.steps, "seed": args.seed, "temperature_mode": args.temperature_mode,
            "fixed_temperature": fixed_t, "objective": objective.label(), "identity": identity,
            "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"), "machine": machine(model),
            "load_average_at_end": [round(x, 2) for x in os.getloadavg()], "dtype": args.dtype,
            "sets": rows, "correlation": rank_report(rows),
            "seconds_per_eval": statistics.median(secs) if secs else None,
            "tokens_per_eval": per_eval, "scored_per_eval": statistics.median(scored) if scored else None,
            "evaluations": len(secs), "tokens_processed": per_eval * len(secs),
            "full_length_seconds_per_eval": (full.get("seconds") or {}).get("ppl"),
            "cache": str(cache_file)}


# ------------------------------------------------------------------------------------------- the report
def _f(v, fmt="{:.3f}") -> str:
    return "-" if v is None else fmt.format(v)


def _k(n: int) -> str:
    return f"{n // 1024}k" if n % 1024 == 0 else str(n)


def markdown(rep: dict, command: str) -> str:
    T, L, W, N = rep["target"], rep["original"], rep["window"], rep["chunks"]
    mode = (f"every set at one temperature, {rep['fixed_temperature']:.4f} (the factors' ranking alone)"
            if rep["temperature_mode"] == "fixed" else "each set at its own temperature")
    lines = [f"Command: `{command}`", "", f"Date: {rep['date']}; machine: {rep['machine']}; {rep['dtype']}.", "",
             f"{Path(str(rep['source'])).name}, {L} -> {T}, corpus `{rep['corpus']}`: the short-window objective "
             f"(`{rep['objective']}`: {rep['samples']} window(s) of {W} tokens x {rep['steps']} step(s), {N} chunks "
             f"with PoSE's skipped position ids, the next-token loss on the targets at positions >= {L}; {mode}) "
             f"against full-length perplexity from `{Path(rep['results']).name}` on {len(rep['sets'])} factor sets.",
             "", "| against | sets | Spearman rho | Kendall tau | verdict |", "|---|---|---|---|---|"]
    c = rep["correlation"]
    for against in ("past the original window", "whole window"):
        x = c[against]
        lines.append(f"| ppl, {against} | {x['n']} | {_f(x['spearman'])} | {_f(x['kendall'])} | "
                     f"{search_proxy.verdict(x['spearman'])} |")
    bt = c.get("by temperature") or {}
    if bt.get("groups"):
        lines += ["", "Within the sets that share a temperature (a fit keeps the temperature fixed, so this is what it "
                  "asks of the objective), against perplexity past the window; the search's sparse-position proxy "
                  "(`proxy`, bench/search_proxy.py) on the same sets for comparison:", "",
                  "| temperature | sets | Spearman rho | Kendall tau | proxy's Spearman |", "|---|---|---|---|---|"]
        for g in bt["groups"]:
            lines.append(f"| {g['temperature']:.4f} | {g['n']} | {_f(g['spearman'])} | {_f(g['kendall'])} | "
                         f"{_f(g.get('proxy_spearman'))} |")
        lines.append(f"| all groups, size-weighted | {bt['objective_sets']} | {_f(bt['objective_weighted_spearman'])} "
                     f"| | {_f(bt.get('proxy_weighted_spearman'))} |")
    lines += ["", f"- best set by the objective: `{c['best by the objective']}`; by perplexity past the window: "
              f"`{c['best by ppl past the window']}`; over the whole window: `{c['best by ppl']}`.",
              f"- one evaluation: {rep['tokens_per_eval']} tokens forward ({_f(rep['scored_per_eval'], '{:.0f}')} "
              f"scored, median), {_f(rep['seconds_per_eval'], '{:.2f} s')} (median over the {rep['evaluations']} "
              f"made in this run's store; other work on the machine inflates them); {rep['tokens_processed']} "
              "tokens processed in all"
              + (f"; a full-length perplexity evaluation took {rep['full_length_seconds_per_eval']:.1f} s in "
                 "bench/search_proxy.py's run" if rep.get("full_length_seconds_per_eval") else "") + ".", ""]
    head = ["set", "kind", "temperature", f"ppl 0-{_k(T)}", f"ppl {_k(L)}-{_k(T)}", "objective (nats)",
            "exp(objective)", "s"]
    lines += ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    for r in sorted(rep["sets"], key=lambda r: r["ppl_past"]):
        lines.append("| " + " | ".join([r["spec"], r["kind"], f"{r['temperature']:.4f}", _f(r["ppl"]),
                                         _f(r["ppl_past"]), _f(r["value"], "{:.5f}"), _f(r["short_ppl"]),
                                         _f(r["seconds"], "{:.1f}")]) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--results", default=str(RESULTS), help="full-length results with the sets (bench/search_proxy.py)")
    ap.add_argument("--source", help="base checkpoint (default: the results' source, SmolLM2-135M)")
    ap.add_argument("--target", type=int, help="target length (default: the results')")
    ap.add_argument("--original-length", type=int, help="the base's window (default: the results')")
    ap.add_argument("--corpus", help="pydoc, licenses or a text file (default: the results')")
    ap.add_argument("--window", type=int, default=2048, help="tokens per short window")
    ap.add_argument("--chunks", type=int, default=2, help="chunks per window (PoSE's default: 2)")
    ap.add_argument("--samples", type=int, default=8, help="windows per step")
    ap.add_argument("--steps", type=int, default=1, help="steps of windows per evaluation (seed, step 0..n-1)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the windows and their positions")
    ap.add_argument("--temperature-mode", choices=("as-is", "fixed"), default="as-is",
                    help="as-is: each set's own temperature; fixed: every set at --temperature")
    ap.add_argument("--temperature", default="longrope", help="the fixed temperature: longrope, yarn, none or a "
                    "number")
    ap.add_argument("--sets", help="comma list of set specs to evaluate (default: all)")
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    ap.add_argument("--device", default="auto", help="auto, cpu or cuda[:N]")
    ap.add_argument("--loss-chunk", type=int, default=1024, help="positions per output-head chunk")
    ap.add_argument("--cached-only", action="store_true", help="report what is already measured, compute nothing")
    ap.add_argument("--cache", help="converted sources and corpora (default: $DPROPE_CACHE/quality)")
    ap.add_argument("--out", default=str(HERE / "results"), help="folder for the report and its store")
    ap.add_argument("--name", help="file name stem (default: short-window-rank-<target>-w<W>-c<N>[-fixed])")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    from _measure import run_report

    return run_report(measure, args, argv, "short_window_rank.py", Path(args.out), stem, markdown)


if __name__ == "__main__":
    sys.exit(main())
