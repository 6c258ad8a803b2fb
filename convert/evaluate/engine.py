"""The evaluation engine under `dprope validate`, the quality benchmarks and the search's fitness: EleutherAI
lm-eval long-context tasks on one model at a time, each (model, task, length) cached by content.

One lm-eval run per (model, task, length): ``max_length`` is the tested length (never the model's own maximum),
batch size 1 on CPU, and the result is cached per (model hash, task, length, limit, corpus) so re-runs are instant.

A HF directory runs in transformers (``convert.evaluate.lmeval_hf.ChunkedHFLM``); a .gguf checkpoint runs in
llama.cpp through llama-cpp-python (``convert.evaluate.lmeval_gguf.GGUFLM``), loaded once at a context of the file's
``context_length`` (at least the longest tested length).

Tasks:
  passkey          project task (convert/evaluate/tasks): key retrieval at several depths, exact match;
  passkey-multi    project task run on the runtime interface, not lm-eval (tasks/passkey_multi.py): K keys in one
                   haystack, K questions on its KV cache, n = K x prompts;
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
import json
import logging
import math
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from convert.errors import ConvertError

log = logging.getLogger(__name__)

TASK_DIR = Path(__file__).parent / "tasks"  # this package's lm-eval task files
PROJECT_TASKS = {"passkey": "dprope_passkey", "ppl": "dprope_ppl"}
# tasks run by this engine on the runtime interface (convert/runtimes/base.py) instead of lm-eval: lm-eval's
# generate_until requests are whole prompts and cannot share a prefix's KV cache
RUNTIME_TASKS = ("passkey-multi",)
ACCURACY_TASKS = ("passkey", "passkey-multi")  # reported as the mean of 0/1 scores ("acc")
RULER_OFFLINE = ("niah_single_1", "niah_multikey_2", "niah_multikey_3", "ruler_vt", "ruler_cwe", "ruler_fwe")
RULER_ESSAY = ("niah_single_2", "niah_single_3", "niah_multikey_1", "niah_multivalue", "niah_multiquery")
RULER_LENGTHS = (4096, 8192, 16384, 32768, 65536, 131072)
RULER_NEEDS_HUB = ("ruler_qa_squad", "ruler_qa_hotpot", "qa_squad", "qa_hotpot")
CACHE_VERSION = 4  # 4: per-sample scores kept (intervals), passkey-multi
BLOCK = 128  # tokens per block of the stored perplexity-by-position sums (fewer for short lengths)


def supported_tasks() -> list[str]:
    return [*PROJECT_TASKS, *RUNTIME_TASKS, *RULER_OFFLINE, *RULER_ESSAY]


def is_ruler(task: str) -> bool:
    return task not in PROJECT_TASKS and task not in RUNTIME_TASKS


def check_tasks(tasks: Sequence[str], lengths: Sequence[int]) -> None:
    unknown = [t for t in tasks if t not in supported_tasks()]
    hub = [t for t in unknown if t in RULER_NEEDS_HUB or t.startswith(("longbench", "babilong", "scrolls"))]
    if hub:
        raise ConvertError(f"task(s) {', '.join(hub)} download data sets from a hub and are skipped offline; "
                           f"offline tasks: {', '.join(supported_tasks())}")
    if unknown:
        raise ConvertError(f"unknown task(s) {', '.join(unknown)}; supported: {', '.join(supported_tasks())}")
    ruler = [t for t in tasks if is_ruler(t)]
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
    from convert.evaluate.ruler_data import ruler_module

    return ruler_module("niah_utils.py")


@contextlib.contextmanager
def local_haystack(text: str) -> Iterator[None]:
    """RULER's essay tasks fetch Paul Graham essays from the hub and split sentences with NLTK punkt (a download).
    For the duration of the block, their haystack is ``text`` and sentences are split by a regex; the originals are
    restored afterwards.  Only attributes of the module objects lm-eval calls are swapped; no installed file
    changes."""
    from convert.compat import lm_eval_namespace

    nu = ruler_niah_module()
    pn = lm_eval_namespace(nu.generate_samples)  # the prepare_niah namespace it runs in
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
    from convert.quiet import quiet_libraries

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
                from convert.runtimes.llamacpp import native_logs

                stack.enter_context(native_logs())
            yield path
    finally:
        if orig_git is not None:
            ev.get_git_commit_hash = orig_git


def model_hash(path: Path) -> str:
    """The model by content: sha256 of every config, tokenizer and weight file (.json, .safetensors) of the
    directory, verify.json excepted (it describes the model, it is not part of it)."""
    from convert.io.files import combine, file_digest

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
    backend: Any = None  # transformers: a convert.runtimes.dpe.DPEBackend, the model runs with DPE's attention

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

    from convert.arch import read_config

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
    numbers: the context it is loaded at, the runtime options as the file runs them (``n_ubatch`` lowered for a
    large vocabulary: ``LlamaCppOptions.for_vocab``) and the llama-cpp-python version."""
    from convert.io.files import combine, file_digest
    from convert.runtimes.llamacpp import gguf_context_length, gguf_vocab_size, import_llama_cpp
    from convert.formats.checkpoint import gguf_tokenizer_dir

    path = Path(path)
    n_ctx = max(gguf_context_length(path), max(lengths))  # reads the whole header: a bad file stops here
    options = options.for_vocab(gguf_vocab_size(path))
    version = import_llama_cpp().__version__
    digest = combine({"gguf": file_digest(path), "n_ctx": n_ctx, "llama.cpp": options.key(),
                      "llama_cpp_python": version})[:16]
    with quiet_lm_eval():
        tok = gguf_tokenizer_dir(path)
    return Run(label, path, digest, "llama.cpp", tok, n_ctx, options)


def _metric(task: str, length: int, results: dict) -> dict:
    """The numbers we report from one lm-eval result block, with the per-sample scores the intervals need
    (``samples``, in document order, and ``sample_ids`` that name each where the document says which key it asks
    for): lm-eval logs them per document (``log_samples``) before reducing them to one number per task."""
    name = PROJECT_TASKS.get(task, task)
    r = results["results"][name]
    pick = lambda k: next((v for key, v in r.items() if key.split(",")[0] == k), None)  # noqa: E731
    logged = sorted((results.get("samples") or {}).get(name) or [], key=lambda x: x["doc_id"])
    logged = [x for x in logged if x.get("filter") == logged[0].get("filter")]  # one entry per document
    if task == "passkey":
        out = {"acc": pick("acc")}
        if logged:
            out["samples"] = [float(x["acc"]) for x in logged]
            out["sample_ids"] = [f"{x['doc_id']}:{(x.get('doc') or {}).get('answer')}" for x in logged]
        return out
    if task == "ppl":
        return {"token_perplexity": pick("token_perplexity"), "loglik_sum": pick("loglik_sum"),
                "token_count": pick("token_count")}
    out = {"score": pick(str(length))}
    if logged:  # RULER scores every length; -1 marks the lengths a document is not of
        out["samples"] = [float(x[str(length)]) for x in logged if float(x.get(str(length), -1)) != -1]
    return out


def corpus_digest(corpus: str | None) -> str:
    """The corpus by content (the default, Python's docs, differs between Python versions)."""
    from convert.evaluate.tasks.ppl import corpus_text

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
    if task in RUNTIME_TASKS:
        out = {"task": task, "length": length, "limit": limit, "model": run.label, "model_hash": run.hash,
               "runtime": run.runtime, "corpus_digest": corpus_digest(corpus), "chunk_tokens": chunk_tokens,
               "seed": seed, "metrics": run_multi(model, tokenizer, run, length, limit, seed)}
        cache_dir.mkdir(parents=True, exist_ok=True)
        cfile.write_text(json.dumps(out, indent=1, default=str))
        return out
    import lm_eval
    from lm_eval.tasks import TaskManager

    from convert.evaluate.tasks.ppl import corpus_text

    meta = {"length": length, "max_seq_lengths": [length], "tokenizer": str(run.tokenizer or run.path),
            "chunk_tokens": chunk_tokens, "corpus": corpus, "seed": seed}
    with quiet_lm_eval():
        if run.runtime == "llama.cpp":
            from convert.evaluate.lmeval_gguf import GGUFLM

            lm = GGUFLM(pretrained=model, max_length=length)  # model: an open GGUFModel
        else:
            from convert.evaluate.lmeval_hf import chunked_lm_class

            lm = chunked_lm_class()(pretrained=model, tokenizer=tokenizer, max_length=length, batch_size=1,
                                    device=str(next(model.parameters()).device), max_batch_size=1)
    # index only the folder the task lives in: the full lm-eval index costs seconds per run
    import lm_eval.tasks as lm_tasks

    folder = TASK_DIR if task in PROJECT_TASKS else Path(lm_tasks.__file__).parent / "ruler"
    tm = TaskManager(include_path=str(folder), include_defaults=False, metadata=meta)
    name = PROJECT_TASKS.get(task, task)
    with contextlib.ExitStack() as ctx:
        if task not in PROJECT_TASKS:  # RULER: only the samples scored, generated once per tokenizer and length
            from convert.evaluate.ruler_data import ruler_samples

            ctx.enter_context(ruler_samples(cache_dir / "ruler-data", limit,
                                            corpus_digest(corpus) if task in RULER_ESSAY else None))
        if task in RULER_ESSAY:
            ctx.enter_context(local_haystack(corpus_text(corpus)))
        ctx.enter_context(quiet_lm_eval())
        res = lm_eval.simple_evaluate(model=lm, tasks=[name], task_manager=tm, limit=limit, log_samples=True,
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
        # per document: the log-likelihood sum and the tokens scored (the units of the perplexity's interval)
        docs = [lp for _, lp in sorted(lm.token_logprobs.items())]
        metrics["doc_ll"] = [float(lp.astype(np.float64).sum()) for lp in docs]
        metrics["doc_tokens"] = [int(len(lp)) for lp in docs]
    out = {"task": task, "length": length, "limit": limit, "model": run.label, "model_hash": run.hash,
           "runtime": run.runtime,
           "corpus_digest": corpus_digest(corpus), "chunk_tokens": chunk_tokens, "seed": seed, "metrics": metrics,
           "lm_eval": {"results": res["results"], "n-samples": res.get("n-samples"),
                       "versions": res.get("versions"), "config": {k: str(v) for k, v in res.get("config", {}).items()}}}
    cache_dir.mkdir(parents=True, exist_ok=True)
    cfile.write_text(json.dumps(out, indent=1, default=str))
    return out


def run_multi(model, tokenizer, run: Run, length: int, limit: int | None, seed: int = 0) -> dict:
    """``passkey-multi`` on a loaded model: ``limit`` haystacks (default 5) of ``length`` tokens sized with the run's
    transformers tokenizer, each decoded once, its K questions on the runtime interface's shared-prefix generation
    (transformers: the prefill's KV cache; llama.cpp: the context's memory).  Text is tokenised as the lm-eval
    models do it: by the transformers tokenizer with its own special tokens, or by the GGUF's own tokenizer."""
    from convert.evaluate.tasks import passkey_multi
    from convert.evaluate.tasks.common import tokenizer as load_tokenizer

    prompts = passkey_multi.make_prompts(load_tokenizer(str(run.tokenizer or run.path)), length, limit or 5, seed)
    if run.runtime == "llama.cpp":
        from convert.runtimes.llamacpp import LlamaCppRuntime

        llm = model.llm
        rt = LlamaCppRuntime.wrap(llm, model.decoder, run.path)
        encode = lambda text, special: llm.tokenize(text.encode("utf-8"), add_bos=special, special=True)  # noqa: E731
        decode = lambda ids: llm.detokenize(ids).decode("utf-8", errors="replace")  # noqa: E731
    else:
        from convert.runtimes.hf import TransformersRuntime

        rt = TransformersRuntime.wrap(model)
        encode = lambda text, special: tokenizer(text, add_special_tokens=special).input_ids  # noqa: E731
        decode = lambda ids: tokenizer.decode(ids, skip_special_tokens=True)  # noqa: E731
    with quiet_lm_eval():
        metrics = passkey_multi.run(rt, encode, decode, prompts)
    log.info("%s passkey-multi @%d: %d of %d keys, %d tokens processed (%d as separate prompts)", run.label, length,
             int(sum(metrics["samples"])), metrics["n"], metrics["tokens_processed"], metrics["tokens_separate"])
    return metrics


# llama.cpp and the transformers tokenizer rebuilt from a GGUF may split a long text a few tokens apart (Gemma 3's
# vocabulary: transformers' rebuild splits a run of 33 spaces as 16 + 17, llama.cpp as 31 + 2; 49145 vs 49152 tokens
# in a 48k window of Python's docs); past this relative difference they tokenise differently (a wrong pre-tokenizer
# splits digits or words otherwise: percents, not parts per million)
TOKEN_COUNT_TOL = 1e-3


def _check_token_count(run: Run, token_logprobs: dict, metrics: dict) -> None:
    """Perplexity divides llama.cpp's log-likelihood by a token count.  The documents were cut with the tokenizer
    the task was given; where llama.cpp splits them into a few tokens more or fewer (within TOKEN_COUNT_TOL) the
    perplexity is taken over the tokens llama.cpp scored (both counts kept in the metrics); beyond it the two
    tokenise differently and the run is refused."""
    scored = sum(len(v) for v in token_logprobs.values())
    counted = metrics.get("token_count")
    if counted is None or scored == int(counted):
        return
    if abs(scored - int(counted)) > TOKEN_COUNT_TOL * int(counted):
        raise ConvertError(f"llama.cpp split the perplexity documents into {scored} tokens where the tokenizer made "
                           f"from {run.path.name} ({run.tokenizer}) counts {int(counted)}: the two tokenise "
                           "differently, so the perplexity would be wrong. Check the GGUF's tokenizer.ggml.pre "
                           "(dprope inspect) and re-export it with dprope export-gguf")
    log.info("%s: llama.cpp scored %d tokens where the tokenizer counts %d; perplexity over llama.cpp's tokens",
             run.label, scored, int(counted))
    ll = sum(float(np.asarray(v, dtype=np.float64).sum()) for v in token_logprobs.values())
    metrics.update(token_count_tokenizer=int(counted), token_count=scored, loglik_sum=ll,
                   token_perplexity=math.exp(-ll / scored))


def load_run(run: Run):
    """(model, tokenizer) of a run: a transformers model (through DPE's attention when the run has that backend) and
    tokenizer, or an open GGUFModel and None."""
    if run.runtime == "llama.cpp":
        from convert.evaluate.lmeval_gguf import open_model

        with quiet_lm_eval():
            return open_model(run.path, run.n_ctx, run.options), None
    model, tok = load_hf_eval(run.path)
    if run.backend is not None:
        from convert.runtimes.dpe import enable_dpe

        enable_dpe(model, run.backend.pair_scales, run.backend.window)
    return model, tok


def load_hf_eval(path: Path):
    from transformers import AutoTokenizer

    from convert.runtimes.hf import eval_device, load_hf

    with quiet_lm_eval():  # transformers' notes on config keys it does not use (short_mscale, long_mscale)
        return load_hf(path, eval_device()), AutoTokenizer.from_pretrained(str(path))


