"""Continued training from each initialisation: the claim of the DPRoPE paper (Wu et al., EMNLP 2024, section 4) at
small scale.

For one base model and one target length, every initialisation (PI, YaRN, `dprope-paper`, the default `dprope`,
`longrope-search`) is baked through the real pipeline, scored training-free, trained at the target length with the
same data, steps, batch, optimiser and seed (the paper's AdamW: lr 2e-5, betas (0.9, 0.999), no warmup, no weight
decay), and scored again on the same held-out samples: token perplexity per position bucket on each corpus, passkey
accuracy per length, and RULER tasks at the target.  `none` (the base model, plain RoPE) is scored once, as a
reference.  The search row runs LongRoPE's evolutionary search first, with the fitness given (full-length
perplexity on a GPU).

    python bench/train_quality.py                       # SmolLM2-135M, 8k -> 32k: a GPU's work (make bench-train-quality)
    python bench/train_quality.py --jobs 3              # three initialisations at a time on one GPU
    python bench/train_quality.py --source tiny/ --target 256 --steps 2 ...     # the CPU smoke run the tests make

Writes train_quality.json, train_quality.md and train_quality.png (held-out loss vs step per initialisation, and
perplexity vs position before and after training) to --out.  Every initialisation's results are kept in
--out/parts as they come, every lm-eval result in --evals (by model content), baked and trained checkpoints in
--cache: a re-run computes only what is missing.  Training data: `stdlib:` (the Python standard library's source,
offline everywhere), a text/JSONL file or folder; evaluation corpora play no part in training.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

import quality  # noqa: E402  (bench/quality.py: baking, corpora, buckets)

log = logging.getLogger("bench.train_quality")

INITS = "pi,yarn,dprope-paper,dprope,longrope-search"
PART_VERSION = 1


def slug(method: str) -> str:
    """A method spec as a file name (specs may hold paths: factors:long=dir/f.json)."""
    import re

    return re.sub(r"[^A-Za-z0-9._=-]+", "_", method)


def cache_root() -> Path:
    from convert.io.files import cache_root as root

    return root() / "train-quality"


def parse_corpora(text: str, cache: Path) -> dict[str, str | None]:
    """``pydoc``, ``licenses``, a path, or ``NAME=PATH`` (a path reported under NAME)."""
    out = {}
    for c in [x.strip() for x in text.split(",") if x.strip()]:
        name, sep, path = c.partition("=")
        if sep:
            if not Path(path).is_file():
                raise SystemExit(f"corpus {path} is not a file")
            out[name] = str(Path(path).resolve())
        else:
            out[c] = quality.corpus_path(c, cache)
    return out


def passkey_lengths(text: str, original: int, target: int) -> list[int]:
    if text == "auto":  # the original window, every doubling, the target
        return sorted({original, *[original * 2**k for k in range(1, 8) if original * 2**k <= target], target})
    return sorted({int(x) for x in text.split(",") if x.strip() and int(x) <= target})


def train_args(args):
    from convert.stages.train import TrainArgs

    return TrainArgs(data=args.train_data, seq_len=args.target, steps=args.steps, global_batch=args.global_batch,
                     micro_batch=args.micro_batch, lr=args.lr, weight_decay=0.0, warmup_steps=0, betas=(0.9, 0.999),
                     save_steps=args.steps + 1, eval_steps=args.eval_every, eval_fraction=args.eval_fraction,
                     eval_blocks=args.eval_blocks, seed=args.seed, gradient_checkpointing=True,
                     pure_bf16=args.pure_bf16, loss_chunk=args.loss_chunk)


def settings(args) -> dict:
    """What every initialisation shares; part of each result's key."""
    from dataclasses import asdict

    return {"target": args.target, "train": {k: v for k, v in asdict(train_args(args)).items()},
            "corpora": args.corpora, "samples": args.samples, "passkey": args.passkey,
            "passkey_lengths": args.passkey_lengths, "ruler": args.ruler, "ruler_limit": args.ruler_limit,
            "search": {"fitness": args.search_fitness, "budget": args.search_budget,
                       "seconds": args.search_seconds, "seed": args.seed}}


def bake_init(src, method: str, args, cache: Path, src_hash: str) -> Path:
    """The baked checkpoint of ``method``: bench/quality.py's ``checkpoint`` with this benchmark's search
    defaults (fitness, seed, budget)."""
    search = {"fitness": args.search_fitness, "seed": args.seed}
    if args.search_budget:
        search["budget_evals"] = args.search_budget
    if args.search_seconds:
        search["budget_seconds"] = args.search_seconds
    return quality.checkpoint(src, method, args.target, cache, src_hash, search, progress=False)


def evaluate(path: Path, label: str, args, corpora: dict, evals: Path) -> list[dict]:
    """Every task on one checkpoint, the same samples for every model; the model is loaded only if a result is
    not stored yet."""
    from convert.evaluate.engine import Run, load_run, cache_file, model_hash, run_one

    run = Run(label, path, model_hash(path))
    plens = passkey_lengths(args.passkey_lengths, args.original, args.target)
    jobs = [("ppl", args.target, c, args.samples) for c in corpora]
    jobs += [("passkey", L, None, args.passkey) for L in plens if args.passkey]
    jobs += [(t, args.target, None, args.ruler_limit) for t in args.ruler.split(",") if t.strip()]
    loaded = None
    out = []
    for task, L, corpus, limit in jobs:
        cpath = corpora.get(corpus) if corpus else None
        chunk = L if task == "ppl" else 0
        t0 = time.time()
        cached = cache_file(evals, run, task, L, limit, cpath, chunk).exists()
        if not cached and loaded is None:
            loaded = load_run(run)
        model, tok = loaded if loaded else (None, None)
        r = run_one(model, tok, run, task, L, limit, cpath, chunk, evals)
        out.append({"task": task, "length": L, "corpus": corpus, "limit": limit, "metrics": r["metrics"],
                    "n": (r.get("lm_eval") or {}).get("n-samples"),
                    "seconds": None if cached else round(time.time() - t0, 1)})
        log.info("%s %s@%d %s: %s", label, task, L, corpus or "", {k: v for k, v in r["metrics"].items()
                                                                   if k != "block_ll"})
    return out


def run_init(args, method: str) -> dict:
    """One initialisation: bake, evaluate, train, evaluate; the part file is written after each phase."""
    import torch

    from convert.pipeline.recipe import resolve_source
    from convert.stages.search import is_search
    from convert.formats.checkpoint import open_source
    from convert.stages.train import train
    from convert.evaluate.engine import model_hash

    out, cache, evals = Path(args.out), Path(args.cache), Path(args.evals)
    part = out / "parts" / f"{slug(method)}.json"
    src = open_source(resolve_source(args.source))
    src_hash = model_hash(src.path)
    args.original = src.spec.original_length
    key = hashlib.sha256(json.dumps([PART_VERSION, src_hash, method, settings(args)], sort_keys=True,
                                    default=str).encode()).hexdigest()[:16]
    rec = json.loads(part.read_text()) if part.exists() else {}
    if rec.get("key") != key:
        rec = {"method": method, "key": key, "seconds": {}, "started": time.time()}
    if rec.get("done"):
        return rec

    def save():
        part.parent.mkdir(parents=True, exist_ok=True)
        rec["finished"] = time.time()
        tmp = part.with_suffix(".tmp")
        tmp.write_text(json.dumps(rec, indent=1, default=str))
        tmp.replace(part)

    corpora = parse_corpora(args.corpora, cache)
    t0 = time.time()
    ckpt = bake_init(src, method, args, cache, src_hash)
    rec["seconds"]["bake"] = round(time.time() - t0, 1)
    if is_search(quality.parse_spec(method)[0]):
        trace = ckpt / "search_trace.json"
        rec["search"] = json.loads(trace.read_text()) if trace.exists() else None
        rec["factors"] = json.loads((ckpt / "config.json").read_text()).get("rope_parameters", {}).get(
            "long_factor") or json.loads((ckpt / "config.json").read_text()).get("rope_scaling", {}).get("long_factor")
    t0 = time.time()
    rec["free"] = evaluate(ckpt, f"{method} (training-free)", args, corpora, evals)
    rec["seconds"]["eval_free"] = round(time.time() - t0, 1)
    save()
    if method != "none" and args.steps > 0:
        targs = train_args(args)
        tkey = hashlib.sha256(json.dumps([model_hash(ckpt), settings(args)["train"]], sort_keys=True,
                                         default=str).encode()).hexdigest()[:12]
        tdir = cache / "trained" / f"{quality.parse_spec(method)[0]}-{args.target}-{tkey}"
        t0 = time.time()
        if not (tdir / "train.json").exists():
            train(ckpt, tdir, targs, force_cpu=not torch.cuda.is_available(), force=True, progress=False)
        rec["train"] = json.loads((tdir / "train.json").read_text())
        rec["seconds"]["train"] = round(time.time() - t0, 1)
        save()
        t0 = time.time()
        rec["trained"] = evaluate(tdir, f"{method} (trained)", args, corpora, evals)
        rec["seconds"]["eval_trained"] = round(time.time() - t0, 1)
    rec["done"] = True
    save()
    return rec


# ------------------------------------------------------------------------------------------- report
def _ppl_cells(results: list[dict], corpus: str, buckets: list[tuple[int, int]], target: int) -> list[float | None]:
    r = next((x for x in results if x["task"] == "ppl" and x["corpus"] == corpus), None)
    if not r or not r["metrics"].get("block_ll"):
        return [None] * len(buckets)
    pm = r["metrics"]
    n_tok = [min(target, len(d) * pm["block"]) for d in pm["block_ll"]]
    return [quality.bucket_ppl(pm["block_ll"], pm["block"], a, b, n_tok) for a, b in buckets]


def _score(results: list[dict], task: str, length: int):
    r = next((x for x in results if x["task"] == task and x["length"] == length), None)
    if not r:
        return None
    return r["metrics"].get("acc") if task == "passkey" else r["metrics"].get("score")


def kt(n: int) -> str:
    """A length as the tables write it: 32k, or 256 where it is not a whole number of k."""
    return f"{n // 1024}k" if n % 1024 == 0 else str(n)


def table(data: dict) -> str:
    T, orig = data["target"], data["original"]
    bks = [(0, orig), (orig, T)]
    plens = data["passkey_lengths"]
    ruler = [t for t in data["ruler"].split(",") if t.strip()]
    head = ["initialisation", "stage"]
    for c in data["corpora"]:
        head += [f"{c} ppl 0-{kt(orig)}", f"{c} ppl {kt(orig)}-{kt(T)}"]
    head += [f"passkey@{kt(L)}" for L in plens] + [f"{t}@{kt(T)}" for t in ruler] + ["held-out loss"]
    lines = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    fmt = lambda v, p=2: "-" if v is None else f"{v:.{p}f}"  # noqa: E731
    for part in data["parts"]:
        m = part["method"]
        for stage in ("free", "trained"):
            res = part.get(stage)
            if res is None:
                continue
            cells = [m, "training-free" if stage == "free" else f"trained {part['train']['steps']} steps"]
            for c in data["corpora"]:
                cells += [fmt(v) for v in _ppl_cells(res, c, bks, T)]
            cells += [fmt(_score(res, "passkey", L)) for L in plens]
            cells += [fmt(_score(res, t, T)) for t in ruler]
            tr = part.get("train")
            loss = None if not tr else (tr["eval_loss_before"] if stage == "free" else tr["eval_loss_after"])
            cells.append(fmt(loss, 3))
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def report(data: dict) -> str:
    s = data["settings"]["train"]
    n_ppl = {c: None for c in data["corpora"]}
    for part in data["parts"]:
        for r in part.get("free") or []:
            if r["task"] == "ppl" and r["metrics"].get("block_ll"):
                n_ppl[r["corpus"]] = len(r["metrics"]["block_ll"])
    lines = [f"Command: `{data['command']}`", "",
             f"Device: {data['device']}; wall time {data['wall_s'] / 60:.1f} min.", "",
             table(data), "",
             f"Training: {s['steps']} steps at {s['seq_len']} tokens, global batch {s['global_batch']} (micro batch "
             f"{s['micro_batch']}), AdamW lr {s['lr']:g}, betas {tuple(s['betas'])}, no warmup, no weight decay, "
             f"seed {s['seed']}, data `{s['data']}`; the held-out loss is the mean over {s['eval_blocks']} held-out "
             f"blocks of that data.",
             "Evaluation, the same samples for every row: "
             + "; ".join(f"`{c}` perplexity on {n} window(s) of {data['target']} tokens" for c, n in n_ppl.items())
             + f"; passkey {data['passkey']} prompt(s) per length"
             + (f"; RULER {data['ruler_limit']} sample(s) per task." if data["ruler"].strip(",") else
                "; RULER not run (--ruler empty).")]
    for part in data["parts"]:
        if part.get("search"):
            tr = part["search"]
            lines.append(f"`{part['method']}`: searched with the `{tr.get('fitness')}` fitness, {tr.get('evals')} "
                         f"evaluations ({tr.get('seconds_per_eval')} s each, stopped by {tr.get('stopped')}), "
                         f"{len(tr.get('trace') or [])} iteration(s), best fitness {tr.get('best_fitness')}.")
    missing = [m for m in data["inits"] if m not in {p["method"] for p in data["parts"] if p.get("done")}]
    if missing:
        lines.append(f"Not finished: {', '.join(missing)}.")
    return "\n".join(lines) + "\n"


def plot(data: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(13, 5))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    c0 = data["corpora"][0]
    for i, part in enumerate(data["parts"]):
        col = colors[i % len(colors)]
        tr = part.get("train")
        if tr and tr.get("eval_losses"):
            xs, ys = zip(*tr["eval_losses"])
            a.plot(xs, ys, marker="o", color=col, label=part["method"])
        for stage, ls in (("free", "--"), ("trained", "-")):
            r = next((x for x in part.get(stage) or [] if x["task"] == "ppl" and x["corpus"] == c0), None)
            if not r or not r["metrics"].get("block_ll"):
                continue
            pm = r["metrics"]
            n_tok = [min(data["target"], len(d) * pm["block"]) for d in pm["block_ll"]]
            width = max(pm["block"], (data["target"] // 32) // pm["block"] * pm["block"])
            pts = quality.curve(pm["block_ll"], pm["block"], n_tok, width)
            if pts:
                xs, ys = zip(*pts)
                b.plot(xs, ys, ls=ls, color=col, label=f"{part['method']} ({'trained' if stage == 'trained' else 'free'})")
    a.set_xlabel("training step")
    a.set_ylabel("held-out loss")
    a.set_title(f"held-out loss at {data['target']} tokens")
    a.legend(fontsize=8)
    b.axvline(data["original"], color="grey", ls=":", lw=1)
    b.set_yscale("log")
    b.set_xlabel("token position")
    b.set_ylabel(f"perplexity ({c0})")
    b.set_title("perplexity vs position: dashed training-free, solid trained")
    b.legend(fontsize=6, ncol=2)
    fig.suptitle(f"{Path(str(data['source'])).name}: {data['original']} -> {data['target']}, {data['device']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def device_name() -> str:
    import torch

    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(0)} (torch {torch.__version__})"
    return f"CPU, {os.cpu_count()} cores ({platform.processor() or platform.machine()}, torch {torch.__version__})"


def collect(args, inits: list[str], wall: float) -> dict:
    parts = []
    for m in inits:
        p = Path(args.out) / "parts" / f"{slug(m)}.json"
        if p.exists():
            parts.append(json.loads(p.read_text()))
    from convert.pipeline.recipe import resolve_source
    from convert.formats.checkpoint import open_source

    original = open_source(resolve_source(args.source)).spec.original_length
    args.original = original
    if parts:  # from the first start to the last result, across runs and worker processes
        wall = max(p.get("finished", 0) for p in parts) - min(p.get("started", time.time()) for p in parts)
    return {"source": args.source, "target": args.target, "original": original, "inits": inits,
            "corpora": list(parse_corpora(args.corpora, Path(args.cache))), "samples": args.samples,
            "passkey": args.passkey, "passkey_lengths": passkey_lengths(args.passkey_lengths, original, args.target),
            "ruler": args.ruler, "ruler_limit": args.ruler_limit, "settings": settings(args), "parts": parts,
            "device": device_name(), "python": platform.python_version(), "wall_s": round(wall, 1)}


def spawn(args, inits: list[str], argv: list[str]) -> None:
    """Each initialisation in its own process, ``--jobs`` at a time (one GPU holds several 135M trainings)."""
    from concurrent.futures import ThreadPoolExecutor

    from tqdm.auto import tqdm

    logs = Path(args.out) / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    base = [a for a in argv]

    def one(m: str) -> tuple[str, int]:
        with open(logs / f"{slug(m)}.log", "w") as fh:
            rc = subprocess.call([sys.executable, str(Path(__file__).resolve()), *base, "--worker", m],
                                 stdout=fh, stderr=subprocess.STDOUT)
        return m, rc

    failed = []
    with ThreadPoolExecutor(args.jobs) as ex, tqdm(total=len(inits), desc="initialisations") as bar:
        for m, rc in ex.map(one, inits):
            bar.update(1)
            bar.set_postfix_str(f"{m}: {'ok' if rc == 0 else f'exit {rc}'}")
            if rc:
                failed.append(m)
    if failed:
        log.error("failed: %s (see %s)", ", ".join(failed), logs)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--source", default=quality.DEFAULT_SOURCE, help="base checkpoint (HF dir, .gguf, pkg://...)")
    ap.add_argument("--target", type=int, default=32768, help="target length (training sequence length too)")
    ap.add_argument("--inits", default=INITS, help="initialisations, comma-separated method specs")
    ap.add_argument("--no-base", action="store_true", help="leave out the base model's reference row")
    ap.add_argument("--train-data", default="stdlib:", help="stdlib:, pydoc:, or a text/JSONL file or folder")
    ap.add_argument("--steps", type=int, default=16, help="training steps (0: training-free rows only)")
    ap.add_argument("--global-batch", type=int, default=4)
    ap.add_argument("--micro-batch", type=int, default=1)
    ap.add_argument("--lr", type=float, default=2e-5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--pure-bf16", action="store_true", help="weights and optimiser states in bf16 (not fp32 + autocast)")
    ap.add_argument("--loss-chunk", type=int, default=4096, help="positions per output-head chunk of the loss (0: "
                    "transformers' loss over all logits)")
    ap.add_argument("--eval-every", type=int, default=4, help="steps between held-out evaluations")
    ap.add_argument("--eval-blocks", type=int, default=4, help="held-out blocks per evaluation")
    ap.add_argument("--eval-fraction", type=float, default=0.01, help="every 1/f-th block of the data is held out")
    ap.add_argument("--corpora", default="pydoc,licenses", help="pydoc, licenses, a text file, or NAME=PATH")
    ap.add_argument("--samples", type=int, default=3, help="perplexity windows per corpus")
    ap.add_argument("--passkey", type=int, default=5, help="passkey prompts per length (0: none)")
    ap.add_argument("--passkey-lengths", default="auto", help="'auto' (the window, each doubling, the target) or a list")
    ap.add_argument("--ruler", default="niah_single_1,niah_multikey_2", help="RULER tasks at the target ('' for none)")
    ap.add_argument("--ruler-limit", type=int, default=10, help="RULER samples per task")
    ap.add_argument("--search-fitness", default="ppl:samples=1", help="the search row's fitness (convert/evaluate/fitness.py)")
    ap.add_argument("--search-budget", type=int, default=None, help="the search's fitness evaluations")
    ap.add_argument("--search-seconds", type=float, default=None, help="the search's time budget")
    ap.add_argument("--jobs", type=int, default=1, help="initialisations run at once, each in its own process")
    ap.add_argument("--out", default=str(HERE / "results" / "train-quality"))
    ap.add_argument("--cache", default=None, help="baked and trained checkpoints (default: $DPROPE_CACHE/train-quality)")
    ap.add_argument("--evals", default=None, help="stored lm-eval results (default: OUT/evals)")
    ap.add_argument("--report-only", action="store_true", help="write the report from the results stored so far")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    argv = list(sys.argv[1:] if argv is None else argv)
    args = ap.parse_args(argv)
    args.cache = args.cache or str(cache_root())
    args.evals = args.evals or str(Path(args.out) / "evals")
    from convert.stages.search import is_search

    inits = ([] if args.no_base else ["none"]) + quality.split_methods(args.inits)
    if any(is_search(quality.parse_spec(m)[0]) for m in inits) and not (args.search_budget or args.search_seconds):
        ap.error("a search initialisation needs --search-budget and/or --search-seconds")
    logging.basicConfig(level=logging.INFO if args.worker else logging.WARNING,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    from convert.evaluate.engine import quiet_lm_eval

    t0 = time.time()
    if args.worker:
        with quiet_lm_eval():
            run_init(args, args.worker)
        return 0
    if args.report_only:
        pass
    elif args.jobs > 1:
        # the search first: it is the longest, and its training comes after it
        order = sorted(inits, key=lambda m: not is_search(quality.parse_spec(m)[0]))
        spawn(args, order, argv)
    else:
        from tqdm.auto import tqdm

        with quiet_lm_eval():
            for m in tqdm(inits, desc="initialisations"):
                run_init(args, m)
    data = collect(args, inits, time.time() - t0)
    data["command"] = "python bench/train_quality.py " + " ".join(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    md = report(data)
    (out / "train_quality.json").write_text(json.dumps(data, indent=1, default=str))
    (out / "train_quality.md").write_text(md)
    plot(data, out / "train_quality.png")
    print(md)
    done = {p["method"] for p in data["parts"] if p.get("done")}
    return 0 if set(inits) <= done else 1


if __name__ == "__main__":
    sys.exit(main())
