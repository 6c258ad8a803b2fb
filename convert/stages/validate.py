"""Validate stage: EleutherAI lm-eval long-context tasks on the extended model and the base, side by side, with the
recipe's gates; validation.json, validation.md, validation.png and the card's Validation section.

The runs themselves (one per model, task and length, cached by content; HF checkpoints in transformers, .gguf files
in llama.cpp; the task list) are the engine's: :mod:`convert.evaluate.engine`.  A .gguf base next to a HF
checkpoint is dequantised into transformers, so both columns of a report come from one runtime where they can.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence


from convert.errors import ConvertError

log = logging.getLogger(__name__)

from convert.evaluate.engine import (  # noqa: F401  (the engine's names, as the validate stage's API)
    PROJECT_TASKS, RULER_ESSAY, RULER_LENGTHS, RULER_OFFLINE, TASK_DIR, Run, cache_file, check_tasks, corpus_digest,
    gguf_run, model_hash, quiet_lm_eval, run_one, supported_tasks, with_backend)
from convert.evaluate.engine import load_run
from convert.evaluate.results import Gate, check_gates, gate_problems, markdown, plot, public_row, table_rows  # noqa: F401

@dataclass
class Validation:
    rows: list[dict]
    failed: list[tuple[Gate, str]]
    markdown: str
    out_dir: Path


def base_window(base: Path) -> int | None:
    """The context a base model was made for: a GGUF's ``<arch>.context_length``, a HF config's
    ``max_position_embeddings``; None where neither is read."""
    from convert.arch import read_config
    from convert.runtimes.llamacpp import gguf_context_length

    base = Path(base)
    try:
        if base.suffix == ".gguf" and base.is_file():
            return gguf_context_length(base)
        n = read_config(base).get("max_position_embeddings")
    except (ConvertError, OSError):
        return None
    return int(n) if n else None


def validate(checkpoint: Path, base: Path | None = None, lengths: Sequence[int] = (4096, 8192, 16384),
             tasks: Sequence[str] = ("passkey", "ppl"), limit: int | None = 5, out_dir: Path | None = None,
             corpus: str | None = None, gates: Sequence[str] = (), cache_dir: Path | None = None,
             command: str = "", progress: bool = True, gguf_options=None, backend=None,
             split_at: Sequence[int] = ()) -> Validation:
    """Run the tasks on ``checkpoint`` (a HF directory, or a .gguf run in llama.cpp) and on ``base``; write
    validation.json/.md/.png to ``out_dir`` (default: the checkpoint directory, or ``<name>-validation/`` beside a
    GGUF).  ``gguf_options``: how llama.cpp runs GGUFs (``convert.runtimes.llamacpp.LlamaCppOptions``).  ``backend`` (a
    :class:`convert.runtimes.dpe.DPEBackend`) runs the checkpoint in transformers through DPE's attention (evaluation
    only; a .gguf checkpoint is then dequantised).  ``split_at``: positions where the perplexity buckets also split
    (besides the lengths and the base's window), e.g. the original window when the base is itself an extension."""
    from convert.runtimes.llamacpp import LlamaCppOptions
    from convert.formats.checkpoint import cache_root, open_source

    lengths = sorted(int(x) for x in lengths)
    check_tasks(tasks, lengths)
    for x in split_at:  # refused before anything runs
        if not 0 < int(x) < lengths[-1]:
            raise ConvertError(f"--split-at {x} lies outside the windows scored (1 .. {lengths[-1] - 1})")
    parsed_gates = [Gate.parse(g) for g in gates]
    if any(g.relative for g in parsed_gates) and base is None:
        raise ConvertError("relative gates ('x base') need --base")
    # the base's window splits the perplexity bucket it falls in (inside and past it), also where no length is it
    window = base_window(base) if base is not None else None
    problems = gate_problems(parsed_gates, tasks, lengths, window)
    if problems:  # refused before anything runs, not after
        raise ConvertError("; ".join(problems))
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
                        model, tok = load_run(run)  # loaded once per model, only when something must run
                    results.append(run_one(model, tok, run, task, L, limit, corpus, lengths[-1], cache_dir))
                finally:
                    bar.advance(job)
            if hasattr(model, "close"):  # llama.cpp frees its context now, not at garbage collection
                model.close()
            del model
    edges = sorted({*([window] if window else []), *(int(x) for x in split_at)})
    rows = table_rows(results, lengths, edges)
    failed = check_gates(rows, parsed_gates)
    md = markdown(rows, command or f"dprope validate {checkpoint}", failed, parsed_gates,
                  models=[r.describe() for r in runs])
    out_dir.mkdir(parents=True, exist_ok=True)
    from convert.card import versions

    (out_dir / "validation.json").write_text(json.dumps(
        {"rows": [public_row(r) for r in rows],
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
    from convert.card import link_validation

    link_validation(out_dir, md)
