"""Does the search's CPU proxy rank factor sets the way full-length perplexity does?

LongRoPE's search (``--method longrope-search``) compares hundreds of factor sets by a fitness.  Its reference
fitness, perplexity at the target length, costs minutes per set on a CPU; the proxy (``convert/evaluate/fitness.py``:
sparse position ids, a 2k-token forward) costs seconds.  A proxy is only useful if it orders factor sets as the
reference does, so this script scores the same sets both ways and reports the rank correlation (Spearman's rho and
Kendall's tau, scipy.stats) and the wall time of one evaluation of each kind.

The sets: the base with plain RoPE (`none`), every registered formula and DPRoPE method, the variants measured
when the default was chosen, and seeded random monotone sets on the 0.01 grid (mutants of the search's own seeds,
YaRN's shape and the default, as the search makes them, and uniformly random ones).

Full-length perplexity is bench/quality.py's evaluation (each set baked by the pipeline, lm-eval's `ppl` task on
one document of the target length) with its stored results (bench/results/evals, keyed by the model's content), so
the sets it already measured cost nothing and the rest are computed exactly the same way (about 2.5 minutes per
set for SmolLM2-135M at 16k on 2 CPU cores).  Proxy values are stored beside them (keyed by the base's content, the
proxy's settings and the factors), so an interrupted run resumes and a re-run is instant.

    python bench/search_proxy.py                        # SmolLM2-135M, 8k -> 16k, pydoc: the README's numbers
    python bench/search_proxy.py --cached-only          # report what is measured so far, compute nothing
    python bench/search_proxy.py --methods none,yarn --random 1 --original-length 1024 --target 2048  # smoke run

Writes search_proxy.md / .json / .png (proxy against perplexity, log-log) into --out.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

import quality  # noqa: E402

log = logging.getLogger("bench.search_proxy")
PROXY_CACHE_VERSION = 1
RANDOM_METHOD = "bench-random"
# the variants of the default's selection run (README, "Choosing the default"): measured already, so free here
SELECTION_VARIANTS = ("yarn:temperature=longrope", "dprope-guard:temperature=yarn", "dprope-coverage:temperature=yarn",
                      "dprope-ramp:temperature=yarn", "dprope-ramp:temperature=yarn:low=0.0003",
                      "dprope-ramp:temperature=yarn:low=0.00003", "dprope-ramp:temperature=yarn:high=0.03",
                      "dprope-ramp:temperature=longrope", "dprope-ramp:temperature=longrope:low=0.0003")
# how the verdict line reads a Spearman correlation (stated here, before any number is seen)
STRONG, PARTIAL = 0.8, 0.5


# ------------------------------------------------------------------------------------------- random factor sets
def _random_set(ctx, *, seed: int = 0, index: int = 0, temperature: str = "longrope", bins: int = 360):
    """A seeded random monotone factor set on the search's grid, in [1, 1 + s]: for index % 4 == 0 a mutant of
    YaRN's shape, == 2 a mutant of the dprope default (1 to 4 of the search's mutation passes, p = 0.3), odd a
    uniformly random one; with LongRoPE's temperature (the search's fixed one) unless told otherwise."""
    import numpy as np

    from dprope.methods import _compute, run_method
    from dprope.methods import temperature as temperature_of
    from dprope.search import longrope_yarn_shape, make_space, mutate, to_key
    from dprope.search_config import SearchConfig

    space = make_space(ctx, SearchConfig())
    rng = np.random.default_rng([int(seed), int(index)])
    if index % 2 == 0:
        base = longrope_yarn_shape(ctx) if index % 4 == 0 else run_method("dprope", ctx).factors
        key = to_key(base, 1.0, space)
        for _ in range(1 + (index // 4) % 4):
            key = mutate(key, space, rng, 0.3)
    else:
        key = tuple(int(u) for u in np.sort(rng.integers(space.lo, space.hi + 1, space.n_genes)))
    factors, _ = space.expand(key)
    r = _compute(ctx, candidates=[], extra_candidates={"random": factors}, bins=int(bins))
    r.temperature = temperature_of(temperature, ctx.scale, ctx.original_length)
    return r


def register_random_method() -> None:
    from dprope.methods import available_methods, register_method

    if RANDOM_METHOD not in available_methods():
        register_method(RANDOM_METHOD, "a seeded random monotone factor set on the 0.01 grid (bench/search_proxy.py)",
                        "user", seed=0, index=0, temperature="longrope", bins=360)(_random_set)


# ------------------------------------------------------------------------------------------- the measurement
def factor_sets(args, methods_registry) -> list[str]:
    if args.methods == "default":
        named = ["none", *methods_registry.available_methods(standalone=True), *SELECTION_VARIANTS]
        named = [m for m in named if m != RANDOM_METHOD]
    else:
        named = [m for m in args.methods.split(",") if m]
    return list(dict.fromkeys(named)) + [f"{RANDOM_METHOD}:seed={args.seed}:index={i}" for i in range(args.random)]


def _factors_of(spec: str, path: Path, n_pairs: int) -> tuple[list[float], float]:
    if spec == "none":  # the base itself: plain RoPE
        return [1.0] * n_pairs, 1.0
    d = json.loads((path / "dprope_factors.json").read_text())
    return [float(x) for x in d["factors"]], float(d["temperature"])


def _proxy_file(evals: Path, src_hash: str, target: int, identity: dict, factors, temperature) -> Path:
    key = hashlib.sha256(json.dumps([PROXY_CACHE_VERSION, src_hash, identity, [round(f, 6) for f in factors],
                                     round(temperature, 9)], sort_keys=True, default=str).encode()).hexdigest()[:20]
    return evals / f"{src_hash}-proxy-{target}-{key}.json"


def _correlations(xs: list[float], ys: list[float]) -> dict:
    from scipy.stats import kendalltau, spearmanr

    if len(xs) < 3:
        return {"n": len(xs), "spearman": None, "kendall": None}
    s, k = spearmanr(xs, ys), kendalltau(xs, ys)
    return {"n": len(xs), "spearman": float(s.statistic), "spearman_p": float(s.pvalue),
            "kendall": float(k.statistic), "kendall_p": float(k.pvalue)}


def measure(args) -> dict:
    from tqdm.auto import tqdm

    import dprope.methods as M
    from convert.evaluate.fitness import FitnessSpec, load_model, make_fitness
    from convert.pipeline.recipe import resolve_source
    from convert.formats.checkpoint import open_source
    from convert.evaluate.engine import Run, load_hf_eval, cache_file, model_hash, run_one

    register_random_method()
    cache = Path(args.cache) if args.cache else quality.cache_root()
    evals = Path(args.evals)
    src = open_source(resolve_source(args.source))
    src_hash = model_hash(src.path)
    spec = src.spec.with_window(args.original_length) if args.original_length else src.spec
    original, T = spec.original_length, int(args.target)
    corpus = quality.corpus_path(args.corpus, cache)
    proxies = [FitnessSpec.parse(p) for p in args.proxies.split(",") if p]
    # wall times of the full-length evaluations, by stored file, kept beside them (the store has no field for it)
    ledger_file = evals / "seconds.json"
    ledger = json.loads(ledger_file.read_text()) if ledger_file.exists() else {}

    rows, seen = [], {}
    for s in tqdm(factor_sets(args, M), desc="bake", unit="set"):
        path = quality.checkpoint(src, s, T, cache, src_hash, original_length=args.original_length)
        factors, temp = _factors_of(s, path, spec.head_dim // 2)
        ident = (tuple(round(f, 6) for f in factors), round(temp, 9))
        if ident in seen:  # the same factors and temperature under another name: one point
            seen[ident]["aliases"].append(s)
            continue
        row = {"spec": s, "kind": "random" if s.startswith(RANDOM_METHOD) else "method", "aliases": [],
               "factors": factors, "temperature": temp, "path": str(path)}
        seen[ident] = row
        rows.append(row)

    # full-length perplexity: lm-eval on the baked checkpoint (bench/quality.py's evaluation and store)
    for row in tqdm(rows, desc=f"ppl@{T}", unit="set"):
        path = Path(row["path"])
        run = Run(row["spec"], path, model_hash(path))
        cfile = cache_file(evals, run, "ppl", T, args.samples, corpus, T)
        if not cfile.exists() and args.cached_only:
            log.warning("not yet measured (skipped with --cached-only): %s", row["spec"])
            row["ppl"] = None
            continue
        t0 = time.perf_counter()
        if cfile.exists():
            r = json.loads(cfile.read_text())
        else:
            model, tok = load_hf_eval(path)
            r = run_one(model, tok, run, "ppl", T, args.samples, corpus, T, evals)
            ledger[cfile.name] = round(time.perf_counter() - t0, 2)
            ledger_file.write_text(json.dumps(ledger, indent=1, sort_keys=True) + "\n")
            del model, tok
        row["ppl_seconds"] = ledger.get(cfile.name)
        m = r["metrics"]
        row["ppl"] = m["token_perplexity"]
        n_tok = [min(T, len(d) * m["block"]) for d in m["block_ll"]]
        row["ppl_past"] = quality.bucket_ppl(m["block_ll"], m["block"], original, T, n_tok)

    # the proxies: the base loaded once, each set's factors applied in memory
    loaded = None
    for p in proxies:
        name = p.text()
        fit = None
        for row in tqdm(rows, desc=name, unit="set"):
            if fit is None:
                loaded = loaded or load_model(src.path, p.resolved()["dtype"], p.resolved()["device"])
                fit = make_fitness(p, src.path, spec, T, loaded=loaded)
            pfile = _proxy_file(evals, src_hash, T, fit.identity(), row["factors"], row["temperature"])
            if pfile.exists():
                rec = json.loads(pfile.read_text())
            elif args.cached_only:
                continue
            else:
                import torch

                t0 = time.perf_counter()
                value = fit(torch.tensor(row["factors"]), row["temperature"])
                rec = {"proxy": name, "identity": fit.identity(), "set": row["spec"], "value": value,
                       "seconds": round(time.perf_counter() - t0, 3)}
                evals.mkdir(parents=True, exist_ok=True)
                pfile.write_text(json.dumps(rec, indent=1) + "\n")
            row.setdefault("proxy", {})[name] = rec["value"]
            row.setdefault("proxy_seconds", {})[name] = rec["seconds"]

    import os

    report = {"source": args.source, "original": original, "target": T, "corpus": args.corpus,
              "cpus": os.cpu_count(), "load_average_at_end": [round(x, 2) for x in os.getloadavg()],
              "samples": args.samples, "proxies": [p.text() for p in proxies], "sets": rows, "correlation": {},
              "seconds": {}}
    for p in report["proxies"]:
        both = [r for r in rows if r.get("ppl") is not None and (r.get("proxy") or {}).get(p) is not None]
        px = [r["proxy"][p] for r in both]
        report["correlation"][p] = {
            "whole window": _correlations(px, [r["ppl"] for r in both]),
            "past the original window": _correlations(px, [r["ppl_past"] for r in both]),
            "best by proxy": min(both, key=lambda r: r["proxy"][p])["spec"] if both else None,
            "best by ppl": min(both, key=lambda r: r["ppl"])["spec"] if both else None,
        }
        secs = [r["proxy_seconds"][p] for r in rows if (r.get("proxy_seconds") or {}).get(p)]
        report["seconds"][p] = statistics.median(secs) if secs else None
    ppl_secs = [r["ppl_seconds"] for r in rows if r.get("ppl_seconds")]
    report["seconds"]["ppl"] = statistics.median(ppl_secs) if ppl_secs else None
    return report


# ------------------------------------------------------------------------------------------- the report
def _f(v, fmt="{:.3f}") -> str:
    return "-" if v is None else fmt.format(v)


def verdict(rho: float | None) -> str:
    if rho is None:
        return "not enough sets measured"
    if rho >= STRONG:
        return f"ranks like full-length perplexity (Spearman >= {STRONG})"
    if rho >= PARTIAL:
        return f"agrees only partly (Spearman {PARTIAL}..{STRONG}): use it to prune, confirm with ppl"
    return f"does not rank like full-length perplexity (Spearman < {PARTIAL}): do not search with it"


def _k(n: int) -> str:
    return f"{n // 1024}k" if n % 1024 == 0 else str(n)


def markdown(rep: dict, command: str) -> str:
    T, L = rep["target"], rep["original"]
    lines = [f"Command: `{command}`", "",
             f"{Path(str(rep['source'])).name}, {L} -> {T}, corpus `{rep['corpus']}`: full-length perplexity "
             f"(lm-eval `ppl`, {rep['samples']} document(s) of {T} tokens) against the search's proxy fitness "
             f"({', '.join(f'`{p}`' for p in rep['proxies'])}) on {len(rep['sets'])} distinct factor sets.", "",
             "| proxy | against | sets | Spearman rho | Kendall tau | verdict |", "|---|---|---|---|---|---|"]
    for p, c in rep["correlation"].items():
        for against in ("whole window", "past the original window"):
            x = c[against]
            lines.append(f"| `{p}` | ppl, {against} | {x['n']} | {_f(x['spearman'])} | {_f(x['kendall'])} | "
                         f"{verdict(x['spearman']) if against == 'whole window' else ''} |")
    lines += [""]
    for p, c in rep["correlation"].items():
        lines.append(f"- `{p}`: best set by the proxy `{c['best by proxy']}`, by full-length perplexity "
                     f"`{c['best by ppl']}`.")
    s = rep["seconds"]
    lines += ["", f"Wall time of one evaluation (median over the evaluations made on this machine, {rep.get('cpus')} "
              f"CPUs, load average {rep.get('load_average_at_end', ['?'])[0]} at the end; other work on the "
              "machine inflates them):", ""]
    lines.append(f"- full-length perplexity, one {T}-token document through lm-eval: "
                 f"{_f(s.get('ppl'), '{:.1f} s')}")
    for p in rep["proxies"]:
        lines.append(f"- `{p}`: {_f(s.get(p), '{:.2f} s')}")
    head = ["set", "kind", "temperature", f"ppl 0-{_k(T)}", f"ppl {_k(L)}-{_k(T)}",
            *[f"`{p}`" for p in rep["proxies"]]]
    lines += ["", "| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    for r in sorted(rep["sets"], key=lambda r: (r.get("ppl") is None, r.get("ppl") or 0)):
        name = r["spec"] + (f" (= {', '.join(r['aliases'])})" if r["aliases"] else "")
        cells = [name, r["kind"], f"{r['temperature']:.4f}", _f(r.get("ppl")), _f(r.get("ppl_past")),
                 *[_f((r.get("proxy") or {}).get(p), "{:.4g}") for p in rep["proxies"]]]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(rep: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(rep["proxies"]) or 1, figsize=(6 * max(1, len(rep["proxies"])), 4.5),
                             squeeze=False)
    for ax, p in zip(axes[0], rep["proxies"]):
        for kind, marker in (("method", "o"), ("random", "x")):
            pts = [(r["ppl"], r["proxy"][p]) for r in rep["sets"] if r["kind"] == kind and r.get("ppl")
                   and (r.get("proxy") or {}).get(p)]
            if pts:
                ax.scatter(*zip(*pts), marker=marker, label=kind)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel(f"full-length perplexity @{rep['target']}")
        ax.set_ylabel(f"proxy `{p}`")
        rho = rep["correlation"][p]["whole window"]["spearman"]
        ax.set_title(f"Spearman {_f(rho)}", fontsize=9)
        ax.grid(alpha=0.3)
        if ax.has_data():
            ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--source", default=quality.DEFAULT_SOURCE, help="base checkpoint (HF dir, .gguf, pkg://...)")
    ap.add_argument("--target", type=int, default=16384, help="target length L'")
    ap.add_argument("--original-length", type=int, help="treat the base as trained at this window (shorter, "
                    "cheaper smoke runs; default: the model's own)")
    ap.add_argument("--corpus", default="pydoc", help="pydoc, licenses, or a text file (full-length perplexity and "
                    "the proxy read the same corpus)")
    ap.add_argument("--samples", type=int, default=1, help="full-length documents per set (bench/quality.py's stored "
                    "evaluations use 1)")
    ap.add_argument("--methods", default="default", help="'default' (none, every registered method and the "
                    "selection variants) or a comma list of method specs (name:key=value...)")
    ap.add_argument("--random", type=int, default=8, help="seeded random monotone sets")
    ap.add_argument("--seed", type=int, default=0, help="seed of the random sets")
    ap.add_argument("--proxies", default="proxy,proxy:task=key", help="comma list of proxy fitness specs to measure")
    ap.add_argument("--cached-only", action="store_true", help="report what is already measured, compute nothing")
    ap.add_argument("--cache", help="baked checkpoints (default: $DPROPE_CACHE/quality or ~/.cache/dprope/quality)")
    ap.add_argument("--evals", default=str(HERE / "results" / "evals"), help="stored evaluations (shared with "
                    "bench/quality.py)")
    ap.add_argument("--out", default=str(HERE / "results"), help="folder for the report")
    ap.add_argument("--name", default="search_proxy", help="file name stem of the report")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    from _measure import run_report

    return run_report(measure, args, argv, "search_proxy.py", Path(args.out), args.name, markdown,
                      extra=lambda rep, out: plot(rep, out / f"{args.name}.png"))


if __name__ == "__main__":
    sys.exit(main())
