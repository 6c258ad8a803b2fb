"""How each serving runtime reads an extended checkpoint's config.json, modelled on its source.

vLLM, SGLang and ExLlamaV2 are not installed here (they need CUDA); MLX-lm is, and `convert.runtimes.mlx` runs it.
Each function below reads a config dict the way that runtime's code does (the files are named in each docstring)
and returns a :class:`Reading`: the per-pair factors it divides the base frequencies by, the cos/sin multiplier
it applies to q and k (our "temperature"), the context it allows, and when it switches between short and long
factors.  Tests compare these readings with what the bake meant; `README.md` tabulates them.

The longrope temperature every one of these runtimes computes when it is given none is Phi-3's
sqrt(1 + ln s / ln L), s = max_position_embeddings / original window, L = the original window
(:func:`longrope_default_scale`).  MLX-lm and ExLlamaV2 apply only that default and read no temperature key.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from convert.arch import (  # noqa: F401  (part of what the readers compute)
    config_temperature, longrope_default_scale, qk_fold, scaling_block as _scaling)
from convert.errors import ConvertError

VLLM_SOURCE = ("vllm-project/vllm: vllm/model_executor/layers/rotary_embedding/__init__.py (get_rope), "
               "phi3_long_rope_scaled_rope.py, vllm/transformers_utils/config.py (patch_rope_parameters), "
               "vllm/config/model.py (_get_and_verify_max_len), vllm/model_executor/models/llama.py")
SGLANG_SOURCE = ("sgl-project/sglang: python/sglang/srt/layers/rotary_embedding/factory.py (get_rope), "
                 "rope_variant.py (Phi3LongRoPEScaledRotaryEmbedding), python/sglang/srt/models/llama.py, "
                 "python/sglang/srt/utils/hf_transformers_utils.py (get_context_length)")
EXLLAMAV2_SOURCE = "turboderp/exllamav2: exllamav2/config.py (ExLlamaV2Config.prepare), exllamav2/rope.py, device.py"
MLX_SOURCE = "ml-explore/mlx-lm: mlx_lm/models/rope_utils.py (initialize_rope, SuScaledRoPE), mlx_lm/models/llama.py"


@dataclass
class Reading:
    runtime: str
    rope: str  # "longrope" (per-pair factors), "plain" (scaling ignored), "linear", ...
    factors: list[float] | None  # divides theta^(-2i/d); None for plain RoPE
    scale: float  # cos/sin multiplier on q and k
    context: int  # the longest sequence the runtime accepts with these settings
    original: int | None
    theta: float
    switch: str  # when the long factors apply
    source: str
    notes: list[str] = field(default_factory=list)


def vllm_reads(cfg: dict, max_model_len: int | None = None) -> Reading:
    """vLLM, given ``--max-model-len`` (None: its default).

    patch_rope_parameters: rope_parameters = rope_scaling + rope_theta + top-level original_max_position_embeddings
    (transformers 4.x; 5.x builds the same dict), and a `type` that disagrees with `rope_type` is an error.
    get_rope (longrope): Phi3LongRoPEScaledRotaryEmbedding(max_position = config.max_position_embeddings,
    original = rope_parameters["original_max_position_embeddings"], short/long factors, short_mscale/long_mscale
    when present, else the default scale); attention_factor is not read.  It uses the long factors for every token
    iff max_model_len > original.  _get_and_verify_max_len: longrope does not multiply max_position_embeddings;
    without --max-model-len, recent versions default a longrope model to the top-level
    original_max_position_embeddings (the original window).
    """
    rp = _scaling(cfg)
    if "rope_theta" in cfg:
        rp.setdefault("rope_theta", cfg["rope_theta"])
    if cfg.get("original_max_position_embeddings") is not None:
        rp["original_max_position_embeddings"] = cfg["original_max_position_embeddings"]
    if "rope_type" in rp and "type" in rp and rp["rope_type"] != rp["type"] and \
            (rp["type"], rp["rope_type"]) != ("su", "longrope"):
        raise ConvertError(f"vLLM refuses rope_type={rp['rope_type']!r} next to type={rp['type']!r}: write one value")
    rtype = rp.get("rope_type") or rp.get("type") or "default"
    rtype = "longrope" if rtype == "su" else rtype
    theta = float(rp.get("rope_theta", 10000))
    max_pos = int(cfg.get("max_position_embeddings", 8192))
    notes = []
    if max_model_len is None:
        max_model_len = int(cfg.get("original_max_position_embeddings") or max_pos) if rtype == "longrope" \
            else max_pos
        notes.append(f"no --max-model-len: vLLM defaults to {max_model_len}")
    if max_model_len > max_pos:
        raise ConvertError(f"vLLM refuses --max-model-len {max_model_len} above max_position_embeddings {max_pos}")
    if rtype != "longrope":
        return Reading("vllm", "plain" if rtype == "default" else rtype, None, 1.0, max_model_len, None, theta,
                       "never", VLLM_SOURCE, notes)
    orig = int(rp["original_max_position_embeddings"])
    default = longrope_default_scale(max_pos, orig)
    use_long = max_model_len > orig
    key = "long" if use_long else "short"
    scale = rp.get(f"{key}_mscale")
    if scale is None:
        notes.append(f"{key}_mscale missing: vLLM applies its default {default:.6g}")
    return Reading("vllm", "longrope", [float(x) for x in rp[f"{key}_factor"]],
                   float(default if scale is None else scale), max_model_len, orig, theta,
                   f"all tokens use the {key} factors (max_model_len {max_model_len} vs original {orig})",
                   VLLM_SOURCE, notes)


def sglang_reads(cfg: dict, max_position_in_batch: int) -> Reading:
    """SGLang for a batch whose largest position is ``max_position_in_batch``.

    models/llama.py: rope_theta, max_position_embeddings, rope_scaling (its original_max_position_embeddings
    overwritten by the top-level key when present).  get_rope: `rope_type` first, then `type`; longrope takes
    short/long factors and short_mscale/long_mscale (else the default scale), never attention_factor.  The long
    factors apply to the whole batch when any position in it is > original.  get_context_length: a rope_scaling
    with original_max_position_embeddings keeps max_position_embeddings as the context (else it multiplies it by
    `factor`).
    """
    rs = _scaling(cfg)
    if rs and cfg.get("original_max_position_embeddings"):
        rs["original_max_position_embeddings"] = cfg["original_max_position_embeddings"]
    theta = float(cfg.get("rope_theta", 10000))
    max_pos = int(cfg.get("max_position_embeddings", 8192))
    factor = 1.0
    if rs:
        factor = float(rs.get("factor", 1))
        if "original_max_position_embeddings" in rs or rs.get("rope_type") == "llama3":
            factor = 1.0
    context = int(factor * max_pos)
    rtype = (rs.get("rope_type") or rs.get("type")) if rs else None
    if rtype != "longrope":
        return Reading("sglang", "plain" if rtype in (None, "default") else rtype, None, 1.0, context, None, theta,
                       "never", SGLANG_SOURCE)
    orig = int(rs.get("original_max_position_embeddings", max_pos))
    default = longrope_default_scale(max_pos, orig)
    key = "long" if max_position_in_batch > orig else "short"
    scale = rs.get(f"{key}_mscale")
    notes = [] if scale is not None else [f"{key}_mscale missing: SGLang applies its default {default:.6g}"]
    return Reading("sglang", "longrope", [float(x) for x in rs[f"{key}_factor"]],
                   float(default if scale is None else scale), context, orig, theta,
                   f"per batch: long factors when any position > {orig}", SGLANG_SOURCE, notes)


def exllamav2_reads(cfg: dict, max_seq_len: int | None = None) -> Reading:
    """ExLlamaV2, optionally with ``config.max_seq_len`` lowered by the user after loading.

    config.py: max_seq_len = the first of max_sequence_length, model_max_length, max_position_embeddings,
    max_seq_len, n_positions; rope_scaling["type"] alone picks the method ("su" or "longrope": long_factor,
    short_factor, and a top-level original_max_position_embeddings it asserts); `rope_type` is read only for
    llama3.  rope.py (get_rope_params_su): max_seq_len > original: long factors and cos/sin x
    sqrt(1 + ln(max_seq_len/original) / ln original); otherwise short factors and 1.  No temperature key is read.
    """
    rs = _scaling(cfg)
    theta = float(cfg.get("rope_theta", 10000.0))
    seq = next((cfg[k] for k in ("max_sequence_length", "model_max_length", "max_position_embeddings",
                                 "max_seq_len", "n_positions") if cfg.get(k) is not None), 2048)
    seq = int(max_seq_len or seq)
    rtype = rs.get("type")
    if rtype not in ("su", "longrope"):
        note = ([f"rope_scaling has rope_type={rs.get('rope_type')!r} but no `type` key: ExLlamaV2 runs plain "
                 "RoPE"] if rs and rtype is None else [])
        return Reading("exllamav2", "plain" if rtype in (None, "default") else rtype, None, 1.0, seq, None, theta,
                       "never", EXLLAMAV2_SOURCE, note)
    for k in ("long_factor", "short_factor"):
        if k not in rs:
            raise ConvertError(f"ExLlamaV2 asserts '{k}' in rope_scaling for type {rtype!r}")
    if "original_max_position_embeddings" not in cfg:
        raise ConvertError("ExLlamaV2 asserts a top-level original_max_position_embeddings for longrope scaling")
    orig = int(cfg["original_max_position_embeddings"])
    if seq > orig:
        factors, scale, key = rs["long_factor"], longrope_default_scale(seq, orig), "long"
    else:
        factors, scale, key = rs["short_factor"], 1.0, "short"
    return Reading("exllamav2", "longrope", [float(x) for x in factors], scale, seq, orig, theta,
                   f"fixed at load: {key} factors (max_seq_len {seq} vs original {orig})", EXLLAMAV2_SOURCE)


def mlx_reads(cfg: dict) -> Reading:
    """MLX-lm 0.32 for Llama/Mistral/Qwen2 (the installed module is the authority: `convert.runtimes.mlx`).

    llama.py / qwen2.py ModelArgs keep `rope_scaling` (a config with only `rope_parameters` gets plain RoPE),
    rope_theta and max_position_embeddings.  initialize_rope: `type` first, then `rope_type`; longrope builds
    SuScaledRoPE(long_factor, original = rope_scaling["original_max_position_embeddings"], max_position_embeddings)
    without short_mscale / long_mscale, so q and k are scaled by the default sqrt(1 + ln s / ln L) and the long
    factors apply at every length.
    """
    rs = _scaling(cfg)
    theta = float(cfg.get("rope_theta", 10000))
    max_pos = int(cfg.get("max_position_embeddings") or 0)
    rtype = (rs.get("type") or rs.get("rope_type", "default")) if rs else "default"
    if rtype in ("default", "linear"):
        notes = ["no rope_scaling (a rope_parameters-only config): MLX-lm runs plain RoPE"] if not rs else []
        return Reading("mlx", "plain" if rtype == "default" else "linear", None, 1.0, max_pos, None, theta,
                       "never", MLX_SOURCE, notes)
    if rtype != "longrope":
        return Reading("mlx", rtype, None, 1.0, max_pos, None, theta, "never", MLX_SOURCE)
    orig = int(rs["original_max_position_embeddings"])
    return Reading("mlx", "longrope", [float(x) for x in rs["long_factor"]], longrope_default_scale(max_pos, orig),
                   max_pos, orig, theta, "always the long factors", MLX_SOURCE,
                   ["short_factor, short_mscale, long_mscale and attention_factor are not read"])
