"""Bake stage: write the extended checkpoint.

Weights are copied file by file (never loaded), config.json is written by hand in the portable ``longrope`` form
that transformers 4.57 and 5.x both read, and the factors, report, resolved recipe and a model card go beside
them.  Everything is written into a temporary directory next to the destination and renamed into place only when
complete, so an interrupted run never leaves a directory that looks finished.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

import dprope
from dprope.methods import DEFAULT_METHOD

from dprope.freqs import check_target_length

from convert.errors import ConvertError
from convert.formats.hf import (  # noqa: F401  (part of the bake's API)
    HF_FORMS, attention_factor, fold_into_qk, hf_factors, longrope_config, rope_config, write_factors,
    write_safetensors)
from convert.io.files import atomic_dir, is_no_space
from convert.arch import RopeSpec
from convert.formats.checkpoint import INDEX_NAME, SINGLE_NAME, Source
from convert.names import CARD_FILE, FACTORS_FILE, PLOT_FILE, RECIPE_FILE, REPORT_FILE  # noqa: F401

if TYPE_CHECKING:
    import torch

    from dprope import DPRoPEResult

log = logging.getLogger(__name__)

# files of the source that the bake writes itself, or that describe the source rather than the output
_NOT_CARRIED = {"config.json", CARD_FILE, FACTORS_FILE, REPORT_FILE, PLOT_FILE, RECIPE_FILE, "verify.json",
                "manifest.json", "search_trace.json", "search_trace.png"}

@dataclass
class BakePlan:
    """The resolved extension: which registered method (``dprope.methods``) with which options, and how it is
    written."""

    method: str
    target_length: int
    options: dict
    short_factor: str  # "same" | "original"
    original_length: int | None = None  # overrides the window read from the config
    # "auto": the exact per-pair factors where every output of the arch can carry them, else the YaRN fit;
    # "exact": the per-pair factors in the HF output always (a GGUF of a YaRN-only arch then differs by the fit)
    hf_form: str = "auto"

    def as_dict(self) -> dict:
        d = dict(method=self.method, target_length=self.target_length, options=dict(self.options),
                 short_factor=self.short_factor, original_length=self.original_length)
        if self.hf_form != "auto":
            d["hf_form"] = self.hf_form
        return d

    def spec_for(self, spec: RopeSpec) -> RopeSpec:
        return spec if self.original_length is None else spec.with_window(self.original_length)


def make_plan(method: str = DEFAULT_METHOD, target_length: int = 0, candidates: list[str] | None = None,
              selection: str | None = None, bins: int | None = None, short_factor: str = "same",
              original_length: int | None = None, options: dict | None = None, hf_form: str = "auto") -> BakePlan:
    """A checked plan.  ``candidates``, ``selection`` and ``bins`` are shorthands for the method options of the
    same meaning (``candidates``, ``select``, ``bins``); ``options`` sets any of the method's options."""
    from dprope.methods import get_method

    try:
        m = get_method(method)
    except dprope.DPRoPEError as e:
        raise ConvertError(str(e)) from None
    if short_factor not in ("same", "original"):
        raise ConvertError(f"--short-factor must be 'same' or 'original', got '{short_factor}'")
    if hf_form not in HF_FORMS:
        raise ConvertError(f"--hf-form must be one of {', '.join(HF_FORMS)}, got '{hf_form}'")
    given = dict(options or {})
    for key, val in (("candidates", candidates), ("select", selection), ("bins", bins)):
        if val is None or (key == "candidates" and list(val) == list(dprope.DEFAULT_CANDIDATES)
                           and key not in m.defaults):
            continue
        if key not in m.defaults:
            raise ConvertError(f"--{'selection' if key == 'select' else key} does not apply to method '{m.name}' "
                               f"(its options: {', '.join(sorted(m.defaults)) or 'none'})")
        given[key] = list(val) if key == "candidates" else val
    try:
        opts = m.options(given)
    except dprope.DPRoPEError as e:
        raise ConvertError(str(e)) from None
    from convert.evaluate.fitness import check_options, is_search

    if is_search(m.name):
        check_options(m.name, opts, int(target_length) or None, original_length)
    if m.name == "dpe":  # the needle scorer's settings, checked before anything is loaded
        from convert.evaluate.needle import NeedleConfig

        NeedleConfig.from_options(opts)
    return BakePlan(m.name, int(target_length), opts, short_factor, int(original_length) if original_length else None,
                    hf_form)


def compute(spec: RopeSpec, plan: BakePlan, src: Source | None = None, progress: bool = True) -> DPRoPEResult:
    """Factors and temperature for this base and plan (the factors stage).  A method that measures the model gets
    its callable built from ``src`` (see :func:`model_callables`)."""
    spec = plan.spec_for(spec)
    check_target_length(plan.target_length, spec.original_length, ConvertError)
    from dprope.freqs import RopeContext
    from dprope.methods import run_method

    from convert.evaluate.fitness import is_search

    if is_search(plan.method):
        raise ConvertError(f"{plan.method} measures the model: its factors come from convert.stages.search.run_search("
                           "source, plan, work_dir), handed to bake(..., result=...), as `dprope extend` and "
                           "`dprope run` do")
    ctx = RopeContext(spec.inv_freq, spec.rope_theta, spec.original_length, plan.target_length)
    with model_callables(plan, src, ctx, progress) as extra:
        try:
            return run_method(plan.method, ctx, **{**plan.options, **extra})
        except dprope.DPRoPEError as e:
            raise ConvertError(str(e)) from None


@contextlib.contextmanager
def model_callables(plan: BakePlan, src: Source | None, ctx, progress: bool = True) -> Iterator[dict]:
    """Options a measuring method needs from the model, built from ``src`` unless the plan already has them:
    ``dpe`` gets DPE's needle scorer (``convert/evaluate/needle.py``) and a progress bar over its sweep."""
    if plan.method != "dpe" or plan.options.get("scorer") is not None or src is None:
        yield {}
        return
    from dprope.dpe import sweep_plan
    from rich.progress import Progress

    from convert.evaluate.needle import NeedleConfig, needle_scorer

    o = plan.options
    try:
        sweep = sweep_plan(ctx, o["groups"], o["held"], o["multipliers"], o["min_scale"])
    except dprope.DPRoPEError as e:
        raise ConvertError(str(e)) from None
    samples = NeedleConfig.from_options(o).samples
    with Progress(disable=not progress, transient=False) as bar:
        job = bar.add_task(f"DPE detection ({sweep.n_groups} groups x {len(sweep.values)} scales, {samples} "
                           "needle prompts each)", total=sweep.calls * samples)

        def on_config(entry):
            bar.update(job, description=f"DPE detection: group {entry['group'] + 1}/{sweep.n_groups} at "
                                        f"{entry['value']:g} -> {entry['score']:.4g}")

        scorer = needle_scorer(src.path, ctx.target_length, ctx.original_length, o,
                               progress=lambda n: bar.advance(job, n))
        yield {"scorer": scorer, "progress": o.get("progress") or on_config}


def _copy_file(src: Path, dst: Path, on_bytes=lambda n: None, piece: int = 1 << 28) -> None:
    """Byte-for-byte copy inside the kernel (copy_file_range: reflinks where the filesystem can), reporting
    progress every ``piece`` bytes; falls back to a buffered copy where the call is unsupported."""
    with open(src, "rb") as fi, open(dst, "wb") as fo:
        size = os.fstat(fi.fileno()).st_size
        done = 0
        try:
            while done < size:
                n = os.copy_file_range(fi.fileno(), fo.fileno(), min(piece, size - done))
                if n == 0:
                    break
                done += n
                on_bytes(n)
        except (OSError, AttributeError) as e:
            if is_no_space(e):
                raise
            log.debug("copy_file_range unavailable for %s (%s); buffered copy", src, e)
            fi.seek(done)
            fo.seek(done)
            fo.truncate()
            while b := fi.read(1 << 24):
                fo.write(b)
                on_bytes(len(b))
                done += len(b)
    if done != size:
        raise ConvertError(f"copying {src} stopped at {done} of {size} bytes; check free disk space")


class _Copier:
    """Copies (or hard-links) the weight files byte for byte on worker threads, several shards at once, while the
    caller computes the factors; pickle weights are re-written as safetensors instead."""

    def __init__(self, src: Source, out: Path, link: bool, progress: bool, workers: int | None = None):
        import threading
        from concurrent.futures import ThreadPoolExecutor

        from tqdm.auto import tqdm

        self.src, self.out, self.link = src, out, link
        self.cancel = threading.Event()
        self._lock = threading.Lock()
        total = sum(f.stat().st_size for f in src.weight_files)
        self.bar = tqdm(total=total, unit="B", unit_scale=True, desc="weights", disable=not progress)
        # copies are kernel-bound; overlapping two or more shards uses the idle core(s)
        n = 1 if src.kind == "pickle" else workers or max(1, min(4, os.cpu_count() or 1, len(src.weight_files)))
        self.pool = ThreadPoolExecutor(n)
        if src.kind == "pickle":
            self.futures = [self.pool.submit(_pickle_to_safetensors, src, out, self.bar)]
        else:
            self.futures = [self.pool.submit(self._one, f) for f in src.weight_files]

    def _advance(self, n: int) -> None:
        with self._lock:
            self.bar.update(n)
        if self.cancel.is_set():
            raise ConvertError("weight copy cancelled")

    def _one(self, f: Path) -> list[str]:
        dst = self.out / f.name
        if self.link:
            try:
                os.link(f, dst)
                self._advance(f.stat().st_size)
                return [f.name]
            except OSError as e:  # other filesystem, no permission: fall back to a copy
                log.info("hard link failed for %s (%s); copying", f.name, e)
        _copy_file(f, dst, self._advance)
        return [f.name]

    def wait(self) -> list[str]:
        """Names of the weight files written; re-raises a copy error."""
        try:
            names = [n for fut in self.futures for n in fut.result()]
        finally:
            self.pool.shutdown(wait=True)
            self.bar.close()
        if self.src.index_file is not None and self.src.kind != "pickle":
            shutil.copyfile(self.src.index_file, self.out / INDEX_NAME)
        return names

    def abort(self) -> None:
        self.cancel.set()
        for fut in self.futures:
            fut.cancel()
        self.pool.shutdown(wait=True)
        self.bar.close()


def _pickle_to_safetensors(src: Source, out: Path, bar) -> list[str]:
    import torch
    from safetensors.torch import save_file

    names, wmap = [], {}
    n = len(src.weight_files)
    for i, f in enumerate(src.weight_files, 1):
        sd = torch.load(f, map_location="cpu", weights_only=True, mmap=True)
        name = SINGLE_NAME if n == 1 else f"model-{i:05d}-of-{n:05d}.safetensors"
        save_file({k: v.contiguous() for k, v in sd.items()}, str(out / name), metadata={"format": "pt"})
        wmap.update({k: name for k in sd})
        names.append(name)
        del sd
        bar.update(f.stat().st_size)
    if n > 1:
        (out / INDEX_NAME).write_text(json.dumps({"metadata": {}, "weight_map": wmap}, indent=2))
    return names


def carry_files(src: Source, out: Path, skip: set[str]) -> list[str]:
    """Tokenizer, generation config and other small files of the source, unchanged."""
    carried = []
    for f in sorted(src.path.iterdir()):
        if f.is_file() and not f.name.startswith(".") and f.name not in skip and f.name not in _NOT_CARRIED \
                and not f.name.endswith((".bin", ".pt", ".pth", ".gguf")):
            shutil.copyfile(f, out / f.name)
            carried.append(f.name)
    return carried


def bake(src: Source, out: Path, plan: BakePlan, *, force: bool = False, plot: bool = False, link: bool = False,
         progress: bool = True, result: DPRoPEResult | None = None, fold_temperature: bool = False) -> Path:
    """Write the extended checkpoint for ``src`` into ``out``; returns ``out``.

    The weight copy starts first and runs on worker threads while the factors are computed and the small files
    written, so the wall time is close to the copy alone.  ``fold_temperature`` writes the method's attention
    temperature into the q/k weights (copied, never linked) and leaves 1 in the config.
    """
    spec = plan.spec_for(src.spec)
    check_target_length(plan.target_length, spec.original_length, ConvertError)
    out = Path(out)
    if out.resolve() == src.path.resolve():
        raise ConvertError("the output directory is the source directory; choose a new one")
    fold = fold_temperature
    if fold and spec.arch.hf_yarn and plan.hf_form == "auto":
        raise ConvertError(f"--fold-temperature does not apply to {spec.arch.model_type}: its output carries a YaRN "
                           "form, whose temperature every runtime computes itself; pass --hf-form exact to fold the "
                           "method's temperature into the per-pair form")
    if fold and (link or src.kind == "pickle"):
        link = False  # the copies are patched in place: never the source's own files
    # weights plus small files (config, factors, card, tokenizer): what a full disk reports as needed
    need = sum(f.stat().st_size for f in src.weight_files) + (1 << 20) + sum(
        f.stat().st_size for f in src.path.iterdir() if f.is_file() and f.suffix == ".json")
    with atomic_dir(out, force, need_bytes=need) as tmp:
        copier = _Copier(src, tmp, link, progress)
        try:
            result = result or compute(spec, plan, src, progress)
            result.params["method"] = plan.method
            long, short = hf_factors(spec, result, plan.short_factor)
            attn = attention_factor(spec, result)
            folded = attn if fold and not math.isclose(attn, 1.0, rel_tol=0, abs_tol=1e-9) else None
            if folded is not None:
                attn = 1.0
            weights_names = [f.name for f in src.weight_files] if src.kind != "pickle" else []
            carried = carry_files(src, tmp, set(weights_names) | {INDEX_NAME})
            cfg, long, short = rope_config(src.config, spec, plan, result, long, short, attn)
            if folded is not None:
                cfg["dprope"]["temperature_folded"] = folded
            (tmp / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
            write_factors(tmp, long, short, result)
            (tmp / REPORT_FILE).write_text(json.dumps(result.to_dict(), indent=1) + "\n")
            from convert.evaluate.report import write_trace

            write_trace(tmp, result)  # a searched result: its trace beside the report
            if plot:
                from convert.evaluate.report import plot_result

                plot_result(result, tmp / PLOT_FILE)
            (tmp / RECIPE_FILE).write_text(_recipe_text(src, plan))
            from convert.card import write_card

            write_card(tmp, src, plan, result, long, attn, has_plot=plot, config=cfg)
        except BaseException:
            copier.abort()
            raise
        weights = copier.wait()
        if folded is not None:
            n = len(fold_into_qk(tmp, folded))
            log.info("folded temperature %.6g into %d q/k tensors", folded, n)
        log.info("baked %s (weights %s; carried %s)", out, ", ".join(weights), ", ".join(carried))
    return out


def _recipe_text(src: Source, plan: BakePlan) -> str:
    import yaml

    recipe = {"source": src.given, "source_kind": src.kind, **plan.as_dict()}
    flags = f"--target-length {plan.target_length} --method {plan.method}"
    for k, v in plan.options.items():
        flags += f" --opt {k}={','.join(map(str, v)) if isinstance(v, (list, tuple)) else v}"
    flags += f" --short-factor {plan.short_factor}"
    return (f"# Resolved parameters of this extension; re-run with:\n#   dprope extend {src.given} OUT {flags}\n"
            + yaml.safe_dump(recipe, sort_keys=False))


def bake_gguf(src: Path, out: Path, plan: BakePlan, *, force: bool = False, progress: bool = True,
              result: DPRoPEResult | None = None, info=None) -> dict:
    """Extend the GGUF ``src`` in place into ``out`` (a .gguf): its tensors copied as they are, the factors and rope
    keys its architecture's llama.cpp graph reads (convert/formats/gguf_extend.py).  Returns the rewrite's summary
    with the form written, the factors and the temperature.  ``info``: the source's header, already read."""
    from convert.arch import rope_spec_from_gguf
    from convert.formats.gguf_extend import extend_gguf_file
    from convert.io.gguf_meta import read_gguf

    src, out = Path(src), Path(out)
    if out.suffix != ".gguf":
        raise ConvertError(f"{out}: a GGUF source extended in place needs an output file name ending in .gguf "
                           "(or an output directory, to dequantise into a Hugging Face checkpoint instead)")
    if info is None and src.is_file():
        info = read_gguf(src)
    spec = plan.spec_for(rope_spec_from_gguf(src, info))
    check_target_length(plan.target_length, spec.original_length, ConvertError)
    from convert.evaluate.fitness import is_search

    if result is None and (is_search(plan.method) or plan.method == "dpe"):
        raise ConvertError(f"{plan.method} runs the model, which a GGUF extended in place never loads: extend to a "
                           "directory (the GGUF is dequantised once), or give found factors with --method factors "
                           "--opt long=FILE")
    result = result or compute(spec, plan, None, progress)
    return extend_gguf_file(src, out, spec, plan, result, force=force, progress=progress, info=info)
