"""A GGUF extended in place: the source's tensors copied byte for byte (quantised ones stay quantised), the rope
keys and at most one small factor tensor changed.  No weight is loaded and no torch model is built.

What the file carries depends on what llama.cpp's graph for its architecture reads (convert/arch.py, the table):

- ``rope_freqs`` (arch llama and its family): ``rope_freqs.weight`` = the total per-pair factors (a factor tensor the
  source already carries, Llama 3.x's, composed with the extension), the temperature as ``rope.scaling.attn_factor``;
- ``rope_factors`` (arch phi3): ``rope_factors_long.weight`` composed, ``rope_factors_short.weight`` and the
  original window kept, ``rope.scaling.attn_factor`` = Phi-3's sqrt(1 + ln(target / original) / ln original), as the
  HF form states it;
- none (qwen2, qwen3, gemma3): the YaRN parametrisation closest to the method's factors (``dprope.yarn_fit``):
  ``rope.scaling.type`` yarn, ``.factor``, ``.original_context_length``; attn_factor 1, since llama.cpp applies
  YaRN's own 1 + 0.1 ln f to the scaled layers (src/llama-context.cpp) and attn_factor would reach Gemma 3's
  sliding layers too.

Key names and types as llama.cpp reads them (src/llama-arch.cpp LLM_KV_NAMES, src/llama-model.cpp load_hparams):
context_length u32, rope.scaling.factor f32, rope.scaling.original_context_length u32, rope.scaling.type string,
rope.scaling.attn_factor f32.  Nothing is written that the arch's graph ignores.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import numpy as np

from convert.arch import GGUF_FACTORS_FREQS, GGUF_FACTORS_LONGROPE, RopeSpec, longrope_default_scale
from convert.errors import ConvertError
from convert.io.gguf_rewrite import rewrite_gguf

log = logging.getLogger(__name__)

# rope keys an extension rewrites; whatever of them the chosen form does not set is dropped
_ROPE_KEYS = ("rope.scaling.type", "rope.scaling.factor", "rope.scale_linear", "rope.scaling.original_context_length",
              "rope.scaling.attn_factor")


def gguf_form(spec: RopeSpec, long: np.ndarray, target: int, temperature: float) -> dict:
    """What the extended GGUF carries: {"form", "keys": {suffix: (value, type name)}, "tensors": {name: f32}, ...}
    for total factors ``long`` (relative to the plain base, float [n_pairs]) and the method's ``temperature``."""
    long = np.asarray(long, dtype=np.float64)
    if spec.arch.gguf_factors == GGUF_FACTORS_FREQS:
        keys: dict[str, tuple[Any, str]] = {"context_length": (int(target), "UINT32")}
        if not math.isclose(temperature, 1.0, rel_tol=0, abs_tol=1e-9):
            keys["rope.scaling.attn_factor"] = (float(temperature), "FLOAT32")
        return {"form": "rope_freqs", "keys": keys, "tensors": {"rope_freqs.weight": long.astype(np.float32)},
                "temperature": float(temperature), "factors": long}
    if spec.arch.gguf_factors == GGUF_FACTORS_LONGROPE:
        if spec.rope_type != "longrope":
            raise ConvertError(f"a {spec.arch.gguf_arch} GGUF without rope_factors_long/short is not a base this tool "
                               "extends: convert the model with llama.cpp's convert_hf_to_gguf.py")
        orig = int(spec.params["original_max_position_embeddings"])
        t = longrope_default_scale(int(target), orig)
        keys = {"context_length": (int(target), "UINT32"), "rope.scaling.original_context_length": (orig, "UINT32"),
                "rope.scaling.attn_factor": (float(t), "FLOAT32")}
        tensors = {"rope_factors_long.weight": long.astype(np.float32),
                   "rope_factors_short.weight": np.asarray(spec.params["short_factor"], dtype=np.float32)}
        return {"form": "rope_factors", "keys": keys, "tensors": tensors, "temperature": t, "factors": long}
    from dprope.yarn_fit import fit_yarn

    fit = fit_yarn(long, spec.head_dim, spec.rope_theta, spec.original_length, int(target))
    keys = {"context_length": (int(target), "UINT32"), "rope.scaling.type": ("yarn", "STRING"),
            "rope.scaling.factor": (float(fit.factor), "FLOAT32"),
            "rope.scaling.original_context_length": (int(fit.original_length), "UINT32")}
    return {"form": "yarn-fit", "keys": keys, "tensors": {}, "temperature": 1.0 + 0.1 * math.log(fit.factor),
            "factors": fit.factors, "fit": fit}


def write_extended_gguf(src: Path, dst: Path, spec: RopeSpec, form: dict, provenance: dict, *, force: bool = False,
                        progress: bool = True, info=None) -> dict:
    """Write ``dst``: ``src`` with ``form``'s keys and tensors (:func:`gguf_form`) and the provenance keys
    (``dprope.method``, ``dprope.target_length``, ``dprope.version``, ``dprope.rope_form``); returns the rewrite's
    summary."""
    from convert.arch import gguf_fields
    from convert.io.gguf_meta import VALUE_TYPES as vt

    meta, _ = gguf_fields(src, info)
    garch = meta["general.architecture"]
    set_kv = {f"{garch}.{k}": (v, vt[t]) for k, (v, t) in form["keys"].items()}
    set_kv.update({"dprope.method": (str(provenance["method"]), vt["STRING"]),
                   "dprope.target_length": (int(provenance["target_length"]), vt["UINT32"]),
                   "dprope.version": (str(provenance["version"]), vt["STRING"]),
                   "dprope.rope_form": (form["form"], vt["STRING"])})
    # the first window this model was extended from: an output given back as a source composes, and says so
    first = int(meta.get("dprope.original_length") or spec.original_length)
    set_kv["dprope.original_length"] = (first, vt["UINT32"])
    drop = [f"{garch}.{k}" for k in _ROPE_KEYS if f"{garch}.{k}" in meta and f"{garch}.{k}" not in set_kv]
    # a factor tensor the form does not write must not stay behind (a YaRN form of an arch whose graph reads none
    # never has one: rope_spec_from_gguf refuses such a source)
    return rewrite_gguf(src, dst, set_kv=set_kv, drop_kv=drop, set_tensors=form["tensors"], progress=progress,
                        force=force)


def extend_gguf_file(src: Path, dst: Path, spec: RopeSpec, plan: Any, result, *, force: bool = False,
                     progress: bool = True, info=None) -> dict:
    """``src`` extended in place into ``dst`` with a method's ``result`` (its factors relative to the base's effective
    frequencies, and its temperature); returns the rewrite's summary with the form written, its factors and
    temperature, and the exact factors the method asked for (total, relative to the plain base).  ``info``: the
    source's header, already read (convert.io.gguf_meta.read_gguf)."""
    import dprope

    from convert.formats.hf import attention_factor, hf_factors

    long, _ = hf_factors(spec, result, plan.short_factor)
    form = gguf_form(spec, long.astype("float64"), plan.target_length, attention_factor(spec, result))
    summary = write_extended_gguf(src, dst, spec, form, {"method": plan.method, "target_length": plan.target_length,
                                                         "version": dprope.__version__}, force=force, progress=progress,
                                  info=info)
    written = {"form": form["form"], "temperature": form["temperature"],
               "factors": [float(x) for x in form["factors"]], "arch": spec.arch.name,
               "original_length": spec.original_length, "target_length": plan.target_length, "method": plan.method,
               "exact_factors": [float(x) for x in long.tolist()]}
    if form.get("fit") is not None:
        written["yarn_fit"] = {k: v for k, v in form["fit"].to_dict().items() if k != "factors"}
    log.info("extended %s in place: %s form, %d tensors kept as they are", dst, form["form"], summary["tensors_kept"])
    return {**summary, **written}
