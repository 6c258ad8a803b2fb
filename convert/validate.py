"""Validate stage: EleutherAI lm-eval long-context tasks on the extended model and the base, side by side.

One lm-eval run per (model, task, length): ``max_length`` is the tested length (never the model's own maximum),
batch size 1 on CPU, and the result is cached per (model hash, task, length, limit, corpus) so re-runs are instant.

A HF directory runs in transformers (``convert.lmeval.ChunkedHFLM``); a .gguf checkpoint runs in llama.cpp
through llama-cpp-python (``convert.lmeval_gguf.GGUFLM``), loaded once at a context of the file's
``context_length`` (at least the longest tested length), and a .gguf base runs there too.  A .gguf base next to a
HF checkpoint is dequantised into transformers, so both columns of a report come from one runtime where they can.

Tasks:
  passkey          project task (convert/tasks): key retrieval at several depths, exact match;
  ppl              project task: token perplexity per length bucket on a local corpus;
  niah_single_1, niah_multikey_2, niah_multikey_3, ruler_vt, ruler_cwe, ruler_fwe
                   stock RULER synthetic tasks, offline as shipped;
  niah_single_2, niah_single_3, niah_multikey_1, niah_multivalue, niah_multiquery
                   RULER essay-haystack tasks with a local haystack (see ``local_haystack``).
RULER lengths must be among RULER's own (4096, 8192, ..., 131072).
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import json
import logging
import math
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from .errors import ConvertError

log = logging.getLogger(__name__)

TASK_DIR = Path(__file__).parent / "tasks"
PROJECT_TASKS = {"passkey": "dprope_passkey", "ppl": "dprope_ppl"}
RULER_OFFLINE = ("niah_single_1", "niah_multikey_2", "niah_multikey_3", "ruler_vt", "ruler_cwe", "ruler_fwe")
RULER_ESSAY = ("niah_single_2", "niah_single_3", "niah_multikey_1", "niah_multivalue", "niah_multiquery")
RULER_LENGTHS = (4096, 8192, 16384, 32768, 65536, 131072)
RULER_NEEDS_HUB = ("ruler_qa_squad", "ruler_qa_hotpot", "qa_squad", "qa_hotpot")
CACHE_VERSION = 3
BLOCK = 128  # tokens per block of the stored perplexity-by-position sums (fewer for short lengths)


def supported_tasks() -> list[str]:
    return [*PROJECT_TASKS, *RULER_OFFLINE, *RULER_ESSAY]


def check_tasks(tasks: Sequence[str], lengths: Sequence[int]) -> None:
    unknown = [t for t in tasks if t not in supported_tasks()]
    hub = [t for t in unknown if t in RULER_NEEDS_HUB or t.startswith(("longbench", "babilong", "scrolls"))]
    if hub:
        raise ConvertError(f"task(s) {', '.join(hub)} download data sets from a hub and are skipped offline; "
                           f"offline tasks: {', '.join(supported_tasks())}")
    if unknown:
        raise ConvertError(f"unknown task(s) {', '.join(unknown)}; supported: {', '.join(supported_tasks())}")
    ruler = [t for t in tasks if t not in PROJECT_TASKS]
    odd = [L for L in lengths if L not in RULER_LENGTHS]
    if ruler and odd:
        raise ConvertError(f"RULER tasks score only lengths {', '.join(map(str, RULER_LENGTHS))}; "
                           f"{', '.join(map(str, odd))} is not one of them")


# ------------------------------------------------------------------------------------------- RULER essay haystack
def _sentences(text: str) -> list[str]:
    """A regex sentence splitter standing in for NLTK punkt (its data is a download)."""
    parts = re.split(r"(?<=[.!?])\s+(?=[A-Z0-9\"'(\[])", text.strip())
    return [p for p in parts if p]


def ruler_niah_module():
    """The niah_utils module object lm-eval's YAML loader calls (it keeps its own copy, keyed by file mtime)."""
    from .ruler_data import ruler_module

    return ruler_module("niah_utils.py")


@contextlib.contextmanager
def local_haystack(text: str) -> Iterator[None]:
    """RULER's essay tasks fetch Paul Graham essays from the hub and split sentences with NLTK punkt (a download).
    For the duration of the block, their haystack is ``text`` and sentences are split by a regex; the originals are
    restored afterwards.  Only attributes of the module objects lm-eval calls are swapped; no installed file
    changes."""
    nu = ruler_niah_module()
    pn = inspect.unwrap(nu.generate_samples).__globals__  # the prepare_niah namespace it runs in
    orig_get, orig_sent = nu.get_haystack, pn["cached_sent_tokenize"]
    words = re.sub(r"\s+", " ", text).split(" ")

    def get_haystack(type_haystack):
        return words if type_haystack == "essay" else orig_get(type_haystack)

    nu.get_haystack = get_haystack
    pn["cached_sent_tokenize"] = _sentences
    try:
        yield
    finally:
        nu.get_haystack = orig_get
        pn["cached_sent_tokenize"] = orig_sent


# ------------------------------------------------------------------------------------------- running lm-eval
def _quiet_git_hash() -> str | None:
    import subprocess

    try:
        out = subprocess.run(["git", "describe", "--always"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


@contextlib.contextmanager
def quiet_lm_eval(log_file: Path | None = None) -> Iterator[Path]:
    """Keep lm-eval's, transformers' and datasets' notes and Python warnings off the terminal for the duration of
    the block: they go to ``log_file`` (default ~/.cache/dprope/logs/third-party.log) instead
    (``convert.quiet.quiet_libraries``), and so do llama.cpp's own log lines when it is in use."""
    from .quiet import quiet_libraries

    # the libraries attach their own terminal handlers when first imported: import them before swapping handlers
    import lm_eval.evaluator as ev
    import lm_eval.models.huggingface  # noqa: F401

    # lm-eval records the git commit of the working directory with a bare `git describe`, whose "fatal: not a git
    # repository" reaches the terminal outside a checkout (lm_eval/loggers/utils.py get_git_commit_hash)
    orig_git = getattr(ev, "get_git_commit_hash", None)
    if orig_git is not None:
        ev.get_git_commit_hash = _quiet_git_hash
    try:
        with quiet_libraries(log_file) as path, contextlib.ExitStack() as stack:
            if "llama_cpp" in sys.modules:  # llama.cpp's own log lines, when it is in use
                from .llamacpp import native_logs

                stack.enter_context(native_logs())
            yield path
    finally:
        if orig_git is not None:
            ev.get_git_commit_hash = orig_git


def model_hash(path: Path) -> str:
    """The model by content: sha256 of every config, tokenizer and weight file (.json, .safetensors) of the
    directory, verify.json excepted (it describes the model, it is not part of it)."""
    from .digest import combine, file_digest

    files = {f.name: file_digest(f) for f in sorted(Path(path).iterdir())
             if f.is_file() and f.suffix in (".json", ".safetensors") and f.name != "verify.json"}
    return combine(files)[:16]


@dataclass
class Run:
    label: str  # "extended" | "base"
    path: Path  # HF directory (transformers) or .gguf file (llama.cpp)
    hash: str  # the model by content (plus the attention backend's settings when it has one)
    runtime: str = "transformers"  # | "llama.cpp"
    tokenizer: Path | None = None  # the transformers tokenizer the tasks size prompts with (default: path)
    n_ctx: int | None = None  # llama.cpp: the context the model is loaded with
    options: Any = None  # llama.cpp: LlamaCppOptions
    backend: Any = None  # transformers: a convert.dpe_runtime.DPEBackend, the model runs with DPE's attention

    def describe(self) -> str:
        if self.runtime == "llama.cpp":
            return (f"{self.label} `{self.path.name}` (llama.cpp, n_ctx {self.n_ctx}, KV cache "
                    f"{self.options.kv_cache}{', flash attention' if self.options.flash_attn else ''})")
        if self.backend is not None:
            return (f"{self.label} `{self.path.name}` (transformers, {self.backend.describe()}; evaluation only, no "
                    "runtime users deploy supports it)")
        return f"{self.label} `{self.path.name}` (transformers)"


def with_backend(run: Run, backend) -> Run:
    """``run`` evaluated through DPE's attention (``backend``); refuses a checkpoint this tool already extended,
    whose factors would scale positions a second time."""
    from dataclasses import replace

    from .modelinfo import read_config

    if run.runtime != "transformers":
        raise ConvertError("DPE's attention runs in transformers; pass an HF directory or let the .gguf be "
                           "dequantised (--backend dpe does that for a .gguf CHECKPOINT)")
    if "dprope" in read_config(run.path):
        raise ConvertError(f"{run.path} already carries extension factors; DPE's runtime runs on the base model's own "
                           "RoPE: validate the base checkpoint with --backend dpe --dpe-scales EXTENDED_DIR (the scales "
                           "a --method dpe checkpoint detected) or --dpe-scales 2,8,...")
    return replace(run, hash=f"{run.hash}-dpe{backend.tag()}", backend=backend)


def gguf_run(label: str, path: Path, lengths: Sequence[int], options) -> Run:
    """A GGUF measured in llama.cpp.  Its cache identity is the file's content plus what changes llama.cpp's
    numbers: the context it is loaded at, the runtime options and the llama-cpp-python version."""
    from .digest import combine, file_digest
    from .llamacpp import gguf_context_length, import_llama_cpp
    from .source import gguf_tokenizer_dir

    path = Path(path)
    n_ctx = max(gguf_context_length(path), max(lengths))  # reads the whole header: a bad file stops here
    version = import_llama_cpp().__version__
    digest = combine({"gguf": file_digest(path), "n_ctx": n_ctx, "llama.cpp": options.key(),
                      "llama_cpp_python": version})[:16]
    with quiet_lm_eval():
        tok = gguf_tokenizer_dir(path)
    return Run(label, path, digest, "llama.cpp", tok, n_ctx, options)


def _metric(task: str, length: int, results: dict) -> dict:
    """The numbers we report from one lm-eval result block."""
    name = PROJECT_TASKS.get(task, task)
    r = results["results"][name]
    pick = lambda k: next((v for key, v in r.items() if key.split(",")[0] == k), None)  # noqa: E731
    if task == "passkey":
        return {"acc": pick("acc")}
    if task == "ppl":
        return {"token_perplexity": pick("token_perplexity"), "loglik_sum": pick("loglik_sum"),
                "token_count": pick("token_count")}
    return {"score": pick(str(length))}


def corpus_digest(corpus: str | None) -> str:
    """The corpus by content (the default, Python's docs, differs between Python versions)."""
    from .tasks.ppl import corpus_text

    return hashlib.sha256(corpus_text(corpus).encode("utf-8")).hexdigest()[:16]


def cache_file(cache_dir: Path, run: Run, task: str, length: int, limit: int | None, corpus: str | None,
               chunk_tokens: int, seed: int = 0) -> Path:
    key = hashlib.sha256(json.dumps([CACHE_VERSION, run.hash, task, length, limit, corpus_digest(corpus),
                                     chunk_tokens, seed]).encode()).hexdigest()[:20]
    return cache_dir / f"{run.hash}-{task}-{length}-{key}.json"


def run_one(model, tokenizer, run: Run, task: str, length: int, limit: int | None, corpus: str | None,
            chunk_tokens: int, cache_dir: Path, seed: int = 0) -> dict:
    cfile = cache_file(cache_dir, run, task, length, limit, corpus, chunk_tokens, seed)
    if cfile.exists():
        log.info("cached: %s %s @%d", run.label, task, length)
        return json.loads(cfile.read_text())
    import lm_eval
    from lm_eval.tasks import TaskManager

    from .tasks.ppl import corpus_text

    meta = {"length": length, "max_seq_lengths": [length], "tokenizer": str(run.tokenizer or run.path),
            "chunk_tokens": chunk_tokens, "corpus": corpus, "seed": seed}
    with quiet_lm_eval():
        if run.runtime == "llama.cpp":
            from .lmeval_gguf import GGUFLM

            lm = GGUFLM(pretrained=model, max_length=length)  # model: an open GGUFModel
        else:
            from .lmeval import chunked_lm_class

            lm = chunked_lm_class()(pretrained=model, tokenizer=tokenizer, max_length=length, batch_size=1,
                                    device=str(next(model.parameters()).device), max_batch_size=1)
    # index only the folder the task lives in: the full lm-eval index costs seconds per run
    import lm_eval.tasks as lm_tasks

    folder = TASK_DIR if task in PROJECT_TASKS else Path(lm_tasks.__file__).parent / "ruler"
    tm = TaskManager(include_path=str(folder), include_defaults=False, metadata=meta)
    name = PROJECT_TASKS.get(task, task)
    with contextlib.ExitStack() as ctx:
        if task not in PROJECT_TASKS:  # RULER: only the samples scored, generated once per tokenizer and length
            from .ruler_data import ruler_samples

            ctx.enter_context(ruler_samples(cache_dir / "ruler-data", limit,
                                            corpus_digest(corpus) if task in RULER_ESSAY else None))
        if task in RULER_ESSAY:
            ctx.enter_context(local_haystack(corpus_text(corpus)))
        ctx.enter_context(quiet_lm_eval())
        res = lm_eval.simple_evaluate(model=lm, tasks=[name], task_manager=tm, limit=limit, log_samples=False,
                                      random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed,
                                      fewshot_random_seed=seed)
    metrics = _metric(task, length, res)
    if task == "ppl" and run.runtime == "llama.cpp":
        _check_token_count(run, lm.token_logprobs, metrics)
    if task == "ppl" and lm.token_logprobs:
        # per-document log-likelihood sums over BLOCK-token blocks: perplexity by position at any bucket edges
        block = max(1, min(BLOCK, length // 64))
        metrics["block"] = block
        metrics["block_ll"] = [[float(b.sum()) for b in np.split(lp.astype(np.float64),
                                                                    range(block, len(lp), block))]
                               for _, lp in sorted(lm.token_logprobs.items())]
    out = {"task": task, "length": length, "limit": limit, "model": run.label, "model_hash": run.hash,
           "runtime": run.runtime,
           "corpus_digest": corpus_digest(corpus), "chunk_tokens": chunk_tokens, "seed": seed, "metrics": metrics,
           "lm_eval": {"results": res["results"], "n-samples": res.get("n-samples"),
                       "versions": res.get("versions"), "config": {k: str(v) for k, v in res.get("config", {}).items()}}}
    cache_dir.mkdir(parents=True, exist_ok=True)
    cfile.write_text(json.dumps(out, indent=1, default=str))
    return out


def _check_token_count(run: Run, token_logprobs: dict, metrics: dict) -> None:
    """Perplexity divides llama.cpp's log-likelihood by the token count of the tokenizer the documents were made
    with; the two must split the text alike, or the number is wrong."""
    scored = sum(len(v) for v in token_logprobs.values())
    counted = metrics.get("token_count")
    if counted is not None and scored != int(counted):
        raise ConvertError(f"llama.cpp split the perplexity documents into {scored} tokens where the tokenizer made "
                           f"from {run.path.name} ({run.tokenizer}) counts {int(counted)}: the two tokenise "
                           "differently, so the perplexity would be wrong. Check the GGUF's tokenizer.ggml.pre "
                           "(dprope inspect) and re-export it with dprope export-gguf")


def _load_run(run: Run):
    """(model, tokenizer) of a run: a transformers model (through DPE's attention when the run has that backend) and
    tokenizer, or an open GGUFModel and None."""
    if run.runtime == "llama.cpp":
        from .lmeval_gguf import open_model

        with quiet_lm_eval():
            return open_model(run.path, run.n_ctx, run.options), None
    model, tok = _load(run.path)
    if run.backend is not None:
        from .dpe_runtime import enable_dpe

        enable_dpe(model, run.backend.pair_scales, run.backend.window)
    return model, tok


def _load(path: Path):
    from transformers import AutoTokenizer

    from .runtime import eval_device, load_hf

    with quiet_lm_eval():  # transformers' notes on config keys it does not use (short_mscale, long_mscale)
        return load_hf(path, eval_device()), AutoTokenizer.from_pretrained(str(path))


# ------------------------------------------------------------------------------------------- gates and report
_GATE = re.compile(r"^\s*(passkey|ppl|ruler|[a-z_0-9]+)@(\d+)(?:-(\d+))?\s*(>=|<=|>|<)\s*([0-9.eE+-]+)\s*"
                   r"(x\s*base)?\s*$")


@dataclass
class Gate:
    text: str
    metric: str
    length: int
    upper: int | None
    op: str
    value: float
    relative: bool

    @classmethod
    def parse(cls, text: str) -> "Gate":
        m = _GATE.match(text)
        if not m:
            raise ConvertError(f"gate '{text}' is not understood; write e.g. 'passkey@16384 >= 0.9', "
                               "'ppl@0-8192 <= 1.05x base' or 'ruler@16384 >= 0.5'")
        metric, a, b, op, v, rel = m.groups()
        if metric == "ppl" and b is None:
            raise ConvertError(f"gate '{text}': ppl gates name a bucket, e.g. ppl@0-8192 or ppl@8192-16384")
        lo, hi = (int(a), int(b)) if b else (int(a), None)
        return cls(text, metric, lo, hi, op, float(v), bool(rel))


def ppl_buckets(rows: dict, lengths: Sequence[int]) -> dict[tuple[int, int], float]:
    """Perplexity of the tokens between consecutive lengths, from the per-length sums of the same documents."""
    out = {}
    prev_ll, prev_n, prev_len = 0.0, 0, 0
    for L in sorted(lengths):
        m = rows.get(L)
        if m is None:
            continue
        ll, n = m["loglik_sum"], m["token_count"]
        if n > prev_n:
            out[(prev_len, L)] = math.exp(-(ll - prev_ll) / (n - prev_n))
        prev_ll, prev_n, prev_len = ll, n, L
    return out


def table_rows(results: list[dict], lengths: Sequence[int]) -> list[dict]:
    """rows: {name, length, base, extended}: passkey / RULER per length, ppl per bucket, ruler average."""
    by = {}
    for r in results:
        by.setdefault((r["model"], r["task"]), {})[r["length"]] = r["metrics"]
    rows = []
    tasks = sorted({r["task"] for r in results}, key=lambda t: (t != "passkey", t != "ppl", t))
    for task in tasks:
        if task == "ppl":
            b = {m: ppl_buckets(by.get((m, "ppl"), {}), lengths) for m in ("base", "extended")}
            for bucket in sorted(set(b["base"]) | set(b["extended"])):
                rows.append({"name": f"ppl {bucket[0]}-{bucket[1]}", "task": "ppl", "length": bucket,
                             "base": b["base"].get(bucket), "extended": b["extended"].get(bucket)})
            continue
        key = "acc" if task == "passkey" else "score"
        for L in sorted(lengths):
            vals = {m: (by.get((m, task), {}).get(L) or {}).get(key) for m in ("base", "extended")}
            rows.append({"name": f"{task} @{L}", "task": task, "length": L, **vals})
    ruler = [t for t in tasks if t not in PROJECT_TASKS]
    if ruler:
        for L in sorted(lengths):
            vals = {}
            for m in ("base", "extended"):
                xs = [(by.get((m, t), {}).get(L) or {}).get("score") for t in ruler]
                xs = [x for x in xs if x is not None]
                vals[m] = sum(xs) / len(xs) if xs else None
            rows.append({"name": f"ruler average @{L}", "task": "ruler", "length": L, **vals})
    return rows


def check_gates(rows: list[dict], gates: Sequence[Gate]) -> list[tuple[Gate, str]]:
    """(gate, reason) for every failed gate."""
    failed = []
    ops = {">=": lambda a, b: a >= b, "<=": lambda a, b: a <= b, ">": lambda a, b: a > b, "<": lambda a, b: a < b}
    for g in gates:
        want = (g.length, g.upper) if g.metric == "ppl" else g.length
        row = next((r for r in rows if r["task"] == g.metric and r["length"] == want), None)
        if row is None or row["extended"] is None:
            failed.append((g, "not measured in this run (add the task and length)"))
            continue
        ref = g.value
        if g.relative:
            if row["base"] is None:
                failed.append((g, "needs the base model (--base)"))
                continue
            ref = g.value * row["base"]
        if not ops[g.op](row["extended"], ref):
            failed.append((g, f"extended {row['extended']:.4g} is not {g.op} {ref:.4g}"))
    return failed


def _fmt(v) -> str:
    return "-" if v is None else f"{v:.4g}"


def markdown(rows: list[dict], command: str, gates_failed=None, gates=(), models: Sequence[str] = ()) -> str:
    lines = [f"Command: `{command}`", ""]
    if models:
        lines += ["Models: " + "; ".join(models), ""]
    lines += ["| task | base | extended | delta |", "|---|---|---|---|"]
    for r in rows:
        d = None if r["base"] is None or r["extended"] is None else r["extended"] - r["base"]
        lines.append(f"| {r['name']} | {_fmt(r['base'])} | {_fmt(r['extended'])} | "
                     f"{'-' if d is None else f'{d:+.4g}'} |")
    if gates:
        lines += ["", "Gates:"]
        failed = {g.text: why for g, why in (gates_failed or [])}
        for g in gates:
            lines.append(f"- `{g.text}`: {'FAILED (' + failed[g.text] + ')' if g.text in failed else 'pass'}")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, task, ylabel in ((axes[0], "passkey", "passkey accuracy"), (axes[1], "ppl", "perplexity (bucket)")):
        sel = [r for r in rows if r["task"] == task]
        for m, style in (("base", "o--"), ("extended", "s-")):
            pts = [((r["length"][1] if task == "ppl" else r["length"]), r[m]) for r in sel if r[m] is not None]
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], style, label=m)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("tokens" + (" (bucket end)" if task == "ppl" else ""))
        ax.set_ylabel(ylabel)
        if task == "ppl" and ax.has_data():
            ax.set_yscale("log")
        if ax.has_data():
            ax.legend()
        else:
            ax.text(0.5, 0.5, f"{task}: not run", ha="center", va="center", transform=ax.transAxes)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


@dataclass
class Validation:
    rows: list[dict]
    failed: list[tuple[Gate, str]]
    markdown: str
    out_dir: Path


def validate(checkpoint: Path, base: Path | None = None, lengths: Sequence[int] = (4096, 8192, 16384),
             tasks: Sequence[str] = ("passkey", "ppl"), limit: int | None = 5, out_dir: Path | None = None,
             corpus: str | None = None, gates: Sequence[str] = (), cache_dir: Path | None = None,
             command: str = "", progress: bool = True, gguf_options=None, backend=None) -> Validation:
    """Run the tasks on ``checkpoint`` (a HF directory, or a .gguf run in llama.cpp) and on ``base``; write
    validation.json/.md/.png to ``out_dir`` (default: the checkpoint directory, or ``<name>-validation/`` beside a
    GGUF).  ``gguf_options``: how llama.cpp runs GGUFs (``convert.llamacpp.LlamaCppOptions``).  ``backend`` (a
    :class:`convert.dpe_runtime.DPEBackend`) runs the checkpoint in transformers through DPE's attention (evaluation
    only; a .gguf checkpoint is then dequantised)."""
    from .llamacpp import LlamaCppOptions
    from .source import cache_root, open_source

    lengths = sorted(int(x) for x in lengths)
    check_tasks(tasks, lengths)
    parsed_gates = [Gate.parse(g) for g in gates]
    if any(g.relative for g in parsed_gates) and base is None:
        raise ConvertError("relative gates ('x base') need --base")
    if corpus and not Path(corpus).exists():
        raise ConvertError(f"corpus {corpus} does not exist")
    checkpoint = Path(checkpoint)
    in_llama_cpp = checkpoint.suffix == ".gguf" and checkpoint.is_file() and backend is None
    options = gguf_options or LlamaCppOptions()

    def open_run(label: str, given: Path) -> Run:
        given = Path(given)
        if in_llama_cpp and given.suffix == ".gguf" and given.is_file():
            return gguf_run(label, given, lengths, options)
        path = open_source(given).path
        return Run(label, path, model_hash(path))

    runs = [open_run("extended", checkpoint)]
    if base is not None:
        runs.append(open_run("base", base))
    if backend is not None:
        runs[0] = with_backend(runs[0], backend)
    default_out = checkpoint.with_name(checkpoint.stem + "-validation") if in_llama_cpp else checkpoint
    out_dir = Path(out_dir or default_out)
    cache_dir = cache_dir or cache_root() / "validate"
    plan = [(r, t, L) for r in runs for t in tasks for L in lengths]
    from rich.progress import Progress

    results = []
    with Progress(disable=not progress) as bar:
        job = bar.add_task("validate", total=len(plan))
        for run in runs:
            model = tok = None
            for _, task, L in [p for p in plan if p[0] is run]:
                bar.update(job, description=f"{run.label} {task} @{L}")
                try:
                    cached = cache_file(cache_dir, run, task, L, limit, corpus, lengths[-1]).exists()
                    if model is None and not cached:
                        model, tok = _load_run(run)  # loaded once per model, only when something must run
                    results.append(run_one(model, tok, run, task, L, limit, corpus, lengths[-1], cache_dir))
                finally:
                    bar.advance(job)
            if hasattr(model, "close"):  # llama.cpp frees its context now, not at garbage collection
                model.close()
            del model
    rows = table_rows(results, lengths)
    failed = check_gates(rows, parsed_gates)
    md = markdown(rows, command or f"dprope validate {checkpoint}", failed, parsed_gates,
                  models=[r.describe() for r in runs])
    out_dir.mkdir(parents=True, exist_ok=True)
    from .card import versions

    (out_dir / "validation.json").write_text(json.dumps(
        {"rows": [{**r, "length": list(r["length"]) if isinstance(r["length"], tuple) else r["length"]}
                  for r in rows],
         "gates": [{"gate": g.text, "passed": g.text not in {f.text for f, _ in failed},
                    "reason": next((w for f, w in failed if f.text == g.text), None)} for g in parsed_gates],
         "runs": results, "versions": versions(), "lengths": lengths, "tasks": list(tasks), "limit": limit,
         "models": [{"label": r.label, "path": str(r.path), "runtime": r.runtime, "hash": r.hash, "n_ctx": r.n_ctx,
                     "llama_cpp": r.options.key() if r.options else None} for r in runs],
         "backend": {"name": "dpe", **backend.to_dict()} if backend is not None else None},
        indent=1, default=str) + "\n")
    (out_dir / "validation.md").write_text(md)
    plot(rows, out_dir / "validation.png")
    _link_card(out_dir, md)
    return Validation(rows, failed, md, out_dir)


def _link_card(out_dir: Path, md: str) -> None:
    card = out_dir / "README.md"
    if not card.exists():
        return
    text = card.read_text()
    marker = "\n## Validation\n"
    head, _, rest = text.partition(marker)
    tail = ""
    if rest and "\n## " in rest:
        tail = "\n## " + rest.split("\n## ", 1)[1]
    card.write_text(head.rstrip() + "\n" + marker + "\nlm-eval results (`validation.json`, `validation.png`):\n\n"
                    + md + tail)
