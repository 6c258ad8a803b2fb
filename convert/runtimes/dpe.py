"""DPE's attention as an evaluation-only backend for transformers (Llama, Mistral, Qwen2, Qwen3).

DPE (Lu et al. 2025; LuLuLuyi/DPE ``dpe_for_llama.py``) runs two attention passes and merges them, as Self-Extend
does (Jin et al. 2024, "LLM Maybe LongLM"):

- normal: RoPE at the true positions, keys at distance 0 .. W-1 (a sliding window of W tokens);
- grouped: keys at distance >= W, every rotary pair i with its group's scale s_i: query position
  floor(p / s_i) + W - W / s_i, key position floor(p / s_i);

each pass a softmax over its own keys, merged by their log-sum-exp weights (``atten_merge_forward``): the result is
the softmax over all keys with each key scored by the pass it belongs to.

It is registered as a transformers attention function (``AttentionInterface``, name ``dprope_dpe``) and switched on
per model with :func:`enable_dpe`; every attention module of that model carries its settings.  transformers hands
an attention function queries and keys already rotated at their true positions, so the grouped pass rotates them
further by (grouped - true position) per pair, reading the model's current ``inv_freq``.  Queries are processed in
chunks so memory holds a chunk of scores, never the full matrix.  Prefill with any position ids (sparse ones
included) and cached generation work; batches must be unpadded (no attention mask is honoured), and the model
must not be training.

No runtime users deploy supports this (llama.cpp removed Self-Extend from its server in October 2024,
ggml-org/llama.cpp#9859), so it is for evaluation only: a checkpoint baked with ``--method dpe`` carries only the
static form, lambda = s_g per pair.
"""

from __future__ import annotations

import contextlib
import logging
import math
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import torch

from convert.compat import attention_function_registered, attn_implementation
from convert.errors import ConvertError
from convert.runtimes.base import register_runtime
from convert.runtimes.hf import TransformersRuntime

log = logging.getLogger(__name__)

ATTN_NAME = "dprope_dpe"
SCORE_BUDGET = 1 << 25  # float32 scores held per chunk (128 MiB)
SCORE_BUDGET_CUDA = 1 << 28  # 1 GiB
QUERY_CHUNK = 256  # queries per chunk at most on a CPU (measured: 1.6x plain sdpa's CPU time at 4k tokens)


@dataclass
class DPEState:
    """What every attention module of a DPE-enabled model reads.

    pair_scales: float32 [n_pairs], the group scale of each rotary pair; window: W in tokens
    rotary: the model's rotary embedding module (its ``inv_freq`` is read at every call)
    key_positions: layer index -> positions of the keys cached so far [batch, kv_len]
    """

    pair_scales: torch.Tensor
    window: int
    rotary: torch.nn.Module
    previous: str
    key_positions: dict[int, torch.Tensor] = field(default_factory=dict)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def _rotate(x: torch.Tensor, angle: torch.Tensor) -> torch.Tensor:
    """Rotate rotate-half-laid-out x [B, H, T, d] by angle [B, T, d/2] (radians, per pair)."""
    emb = torch.cat((angle, angle), dim=-1)[:, None]  # [B, 1, T, d]
    return x * emb.cos().to(x.dtype) + _rotate_half(x) * emb.sin().to(x.dtype)


def _repeat_kv(x: torch.Tensor, n: int) -> torch.Tensor:
    return x if n == 1 else x.repeat_interleave(n, dim=1)


def _key_positions(state: DPEState, layer: int, pos_q: torch.Tensor, kv_len: int) -> torch.Tensor:
    """Positions of all keys: the queries' own on a prefill, the cached ones plus the new on a cached step."""
    q_len = pos_q.shape[1]
    prev = state.key_positions.get(layer)
    if kv_len == q_len:
        keys = pos_q
    elif prev is not None and prev.shape[1] + q_len == kv_len and prev.shape[0] == pos_q.shape[0]:
        keys = torch.cat([prev.to(pos_q.device), pos_q], dim=1)
    else:  # a cache filled elsewhere: contiguous positions ending at the queries
        start = pos_q[:, :1] - (kv_len - q_len)
        keys = start + torch.arange(kv_len, device=pos_q.device)[None]
    state.key_positions[layer] = keys
    return keys


def _span(pos_k: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> tuple[int, int]:
    """Index range covering every key with lo <= position <= hi in any batch row (positions rise along a row)."""
    a = torch.searchsorted(pos_k.contiguous(), lo[:, None].contiguous(), right=False)
    b = torch.searchsorted(pos_k.contiguous(), hi[:, None].contiguous(), right=True)
    return int(a.min()), int(b.max())


def _softmax_pass(q, k, v, allowed, scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
    """One attention pass over the allowed keys: (output [B, H, c, d], log-sum-exp [B, H, c, 1]); a query with no
    allowed key gets output 0 and log-sum-exp -inf."""
    s = torch.matmul(q, k.transpose(-1, -2)).mul_(scaling)
    s.masked_fill_(~allowed[:, None], -math.inf)
    m = s.amax(dim=-1, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    s.sub_(m).exp_()
    total = s.sum(dim=-1, keepdim=True)
    o = torch.matmul(s, v) / total.clamp_min(torch.finfo(s.dtype).tiny)
    return o, total.log() + m


def dpe_attention(module, query, key, value, attention_mask, scaling: float, dropout: float = 0.0, **kwargs):
    """transformers attention function: query [B, H, Tq, d], key / value [B, Hkv, Tk, d] (rotated at their true
    positions) -> ([B, Tq, H, d], None)."""
    state: DPEState | None = getattr(module, "_dprope_dpe", None)
    if state is None:
        raise ConvertError("the dprope_dpe attention runs only on a model set up with convert.runtimes.dpe.enable_dpe")
    if module.training:
        raise ConvertError("DPE's attention is evaluation-only: call model.eval() first")
    if kwargs.get("sliding_window"):
        raise ConvertError("DPE's attention replaces the attention pattern; sliding-window layers are not supported")
    B, H, Tq, d = query.shape
    Tk = key.shape[2]
    pos_q = kwargs.get("position_ids")
    if pos_q is None:
        pos_q = torch.arange(Tk - Tq, Tk, device=query.device)[None].expand(B, Tq)
    pos_q = pos_q.to(query.device).long().expand(B, Tq)
    pos_k = _key_positions(state, module.layer_idx, pos_q, Tk)
    W = int(state.window)
    n_rep = H // key.shape[1]
    k = _repeat_kv(key, n_rep).float()
    v = _repeat_kv(value, n_rep).float()
    q = query.float()

    # grouped pass: rotate further by (grouped - true position) x inv_freq, per pair
    from dprope.dpe import grouped_key_position, grouped_query_position

    inv = state.rotary.inv_freq.to(device=query.device, dtype=torch.float64)
    scales = state.pair_scales.to(query.device)
    dq = (grouped_query_position(pos_q, scales, W) - pos_q[..., None].double()) * inv
    dk = (grouped_key_position(pos_k, scales) - pos_k[..., None].double()) * inv
    qg = _rotate(q, dq.float())
    kg = _rotate(k, dk.float())

    out = torch.empty(B, H, Tq, d, dtype=torch.float32, device=query.device)
    # on a CPU short chunks keep each pass to the keys it can see (causal, windowed); a GPU wants few, large ones
    cuda = query.device.type == "cuda"
    chunk = max(1, (SCORE_BUDGET_CUDA if cuda else SCORE_BUDGET) // max(1, B * H * Tk))
    chunk = chunk if cuda else min(chunk, QUERY_CHUNK)
    very_low = torch.full((B,), torch.iinfo(torch.long).min // 2, dtype=torch.long, device=query.device)
    for a in range(0, Tq, chunk):
        b = min(Tq, a + chunk)
        pq = pos_q[:, a:b]  # [B, c]
        lo, hi = pq.min(dim=1).values, pq.max(dim=1).values
        # normal pass: true positions, keys at distance 0 .. W-1
        ka, kb = _span(pos_k, lo - W + 1, hi)
        dist = pq[:, :, None] - pos_k[:, None, ka:kb]  # [B, c, n]
        o_n, lse_n = _softmax_pass(q[:, :, a:b], k[:, :, ka:kb], v[:, :, ka:kb], (dist >= 0) & (dist < W), scaling)
        # grouped pass: grouped positions, keys at distance >= W
        ga, gb = _span(pos_k, very_low, hi - W)
        if gb <= ga:
            out[:, :, a:b] = o_n
            continue
        dist = pq[:, :, None] - pos_k[:, None, ga:gb]
        o_g, lse_g = _softmax_pass(qg[:, :, a:b], kg[:, :, ga:gb], v[:, :, ga:gb], dist >= W, scaling)
        # merge by log-sum-exp weights (DPE's atten_merge_forward): w_n = 1 / (1 + exp(lse_g - lse_n))
        w_n = torch.sigmoid(lse_n - lse_g).nan_to_num(1.0)  # no grouped key: all weight on the normal pass
        out[:, :, a:b] = w_n * o_n + (1 - w_n) * o_g
    return out.to(query.dtype).transpose(1, 2).contiguous(), None


def _register() -> None:
    from transformers import AttentionInterface

    if not attention_function_registered(ATTN_NAME):
        AttentionInterface.register(ATTN_NAME, dpe_attention)


def _attention_modules(model) -> list:
    return [m for m in model.modules() if hasattr(m, "q_proj") and hasattr(m, "layer_idx")]


def _rotary(model):
    base = getattr(model, getattr(model, "base_model_prefix", "model"), model)
    rot = getattr(base, "rotary_emb", None)
    if rot is None or not hasattr(rot, "inv_freq"):
        raise ConvertError(f"{type(model).__name__} has no rotary embedding at .{model.base_model_prefix}.rotary_emb; "
                           "DPE's attention supports the architectures marked dpe in convert/arch.py")
    return rot


def enable_dpe(model, pair_scales: torch.Tensor | Sequence[float], window: int):
    """Switch ``model`` to DPE's attention with per-pair scales (float32 [n_pairs]) and local window ``window``;
    returns the model.  Calling it again updates the settings; :func:`disable_dpe` restores the previous
    attention."""
    cfg = model.config
    from convert.arch import ARCHES, lookup_arch

    if not lookup_arch(getattr(cfg, "model_type", None), getattr(cfg, "architectures", None)).dpe:
        raise ConvertError(f"DPE's attention supports {', '.join(a.model_type for a in ARCHES if a.dpe)}, not "
                           f"'{cfg.model_type}'")
    if getattr(cfg, "sliding_window", None) and (cfg.model_type == "mistral"
                                                 or "sliding_attention" in (getattr(cfg, "layer_types", None) or [])):
        raise ConvertError(f"this {cfg.model_type} model uses sliding-window attention (sliding_window "
                           f"{cfg.sliding_window}); DPE's attention does not support it")
    rot = _rotary(model)
    scales = torch.as_tensor(pair_scales, dtype=torch.float32).flatten()
    if scales.numel() != rot.inv_freq.numel():
        raise ConvertError(f"{scales.numel()} pair scales given; the model has {rot.inv_freq.numel()} rotary pairs")
    if not bool(torch.isfinite(scales).all()) or not bool((scales > 0).all()):
        raise ConvertError(f"DPE scales must be finite numbers > 0, got {scales.tolist()}")
    if int(window) < 1:
        raise ConvertError(f"the DPE window must be >= 1 token, got {window}")
    _register()
    mods = _attention_modules(model)
    if not mods:
        raise ConvertError(f"no attention modules found in {type(model).__name__}")
    current = attn_implementation(cfg)
    previous = current if current != ATTN_NAME else getattr(mods[0], "_dprope_dpe").previous
    state = DPEState(scales, int(window), rot, previous)
    for m in mods:
        m._dprope_dpe = state
    if current != ATTN_NAME:
        model.set_attn_implementation(ATTN_NAME)
    log.info("DPE attention on %s: window %d, pair scales %s", type(model).__name__, window, scales.tolist())
    return model


def disable_dpe(model):
    """Back to the attention the model had before :func:`enable_dpe`."""
    mods = _attention_modules(model)
    state = getattr(mods[0], "_dprope_dpe", None) if mods else None
    if state is None:
        return model
    model.set_attn_implementation(state.previous)
    for m in mods:
        del m._dprope_dpe
    return model


@contextlib.contextmanager
def dpe_enabled(model, pair_scales, window: int) -> Iterator:
    enable_dpe(model, pair_scales, window)
    try:
        yield model
    finally:
        disable_dpe(model)


# ----------------------------------------------------------------------------------------------- settings
@dataclass(frozen=True)
class DPEBackend:
    """DPE's runtime settings for one evaluation: group boundaries (pairs), a scale per group, the window."""

    bounds: tuple[int, ...]
    scales: tuple[float, ...]
    window: int

    @property
    def pair_scales(self) -> torch.Tensor:
        from dprope.dpe import pair_scales

        return pair_scales(list(self.bounds), list(self.scales))

    def tag(self) -> str:
        """Short content digest for cache keys and labels."""
        import hashlib
        import json

        return hashlib.sha256(json.dumps([list(self.bounds), list(self.scales), self.window]).encode()).hexdigest()[:10]

    def describe(self) -> str:
        return (f"DPE runtime: window {self.window}, group scales {list(self.scales)} over pair groups "
                f"{list(self.bounds)}")

    def to_dict(self) -> dict:
        return {"bounds": list(self.bounds), "scales": list(self.scales), "window": self.window}


def backend_from(spec: str, n_pairs: int, original_length: int, window: int | None = None,
                 groups: int | None = None) -> DPEBackend:
    """DPE settings from ``spec``: comma-separated group scales (split evenly over the pairs, or over ``groups``
    equal groups when one scale is given), or a directory baked with ``dprope extend --method dpe`` (its detected
    scales, groups and window).  ``window`` overrides; default DPE's 1024, at most an eighth of the original
    window."""
    import json
    from pathlib import Path

    from dprope import DPRoPEError
    from dprope.dpe import default_window, group_bounds

    if not str(spec).strip():
        raise ConvertError("--dpe-scales is empty: give one scale per group, e.g. 2,8,2,8")
    p = Path(spec)
    if p.is_dir() or p.suffix == ".json":
        report = p / "dprope_factors.json" if p.is_dir() else p
        if not report.exists():
            raise ConvertError(f"{p} has no dprope_factors.json: pass a directory baked with --method dpe, or the "
                               "group scales as numbers, e.g. --dpe-scales 2,8,2,8")
        d = (json.loads(report.read_text()).get("params") or {}).get("dpe")
        if not d:
            raise ConvertError(f"{report} was not made by --method dpe (no detected group scales in it); pass the "
                               "scales as numbers, e.g. --dpe-scales 2,8,2,8")
        if d["bounds"][-1] != n_pairs:
            raise ConvertError(f"{report} has scales for {d['bounds'][-1]} pairs; this model has {n_pairs}")
        return DPEBackend(tuple(d["bounds"]), tuple(float(x) for x in d["scales"]),
                          int(window or d.get("window") or default_window(original_length)))
    try:
        scales = [float(x) for x in str(spec).split(",") if x.strip()]
    except ValueError:
        raise ConvertError(f"--dpe-scales takes comma-separated numbers or a directory baked with --method dpe, "
                           f"got {spec!r}") from None
    if len(scales) == 1 and groups:
        scales = scales * int(groups)
    try:
        bounds = group_bounds(n_pairs, len(scales))
        if len(bounds) - 1 != len(scales):
            raise DPRoPEError(f"{len(scales)} group scales for {n_pairs} pairs: give at most one per pair")
        from dprope.dpe import pair_scales

        pair_scales(bounds, scales)
    except DPRoPEError as e:
        raise ConvertError(str(e)) from None
    return DPEBackend(tuple(bounds), tuple(scales), int(window or default_window(original_length)))


@register_runtime
class DPERuntime(TransformersRuntime):
    """A HF directory in transformers with DPE's attention (:func:`enable_dpe`): evaluation only."""

    name = "dpe"
    source = "LuLuLuyi/DPE: dpe_for_llama.py (attention); transformers as above for everything else"

    def __init__(self, path, backend: DPEBackend, model=None, device: str = "cpu"):
        super().__init__(path, model=model, device=device)
        self.backend = backend
        enable_dpe(self.model, backend.pair_scales, backend.window)

    def close(self) -> None:
        if self.model is not None:
            disable_dpe(self.model)
        super().close()
