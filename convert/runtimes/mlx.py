"""MLX-lm as a runtime: load an extended HF directory in mlx-lm (Apple's MLX; `mlx[cpu]` on Linux), read the rotary
module it builds, and compare its logits with transformers'.  `dprope verify` runs :func:`check_mlx` as the
``mlx-parity`` check when mlx-lm is importable and reports it skipped otherwise.

How mlx-lm reads our config (ml-explore/mlx-lm, mlx_lm/models/rope_utils.py `initialize_rope`; `convert.runtimes.readers`
models it without MLX): longrope becomes SuScaledRoPE with the long factors at every length and q/k scaled by its
own default sqrt(1 + ln s / ln L); it reads no attention_factor and, in 0.32, passes no long_mscale.  A temperature
other than that default is therefore lost in the HF directory, and `dprope export` writes the portable copy
(`convert.formats.portable`) whose config carries the default and whose q/k weights carry the rest.  The check reads the
loaded module itself, so a later mlx-lm that reads long_mscale or switches to the short factors is judged by what
it does, not by what this docstring says.
"""

from __future__ import annotations

import importlib.util
import logging
import math
import time
from pathlib import Path
from typing import Sequence

import numpy as np

from convert.compat import mlx_rope_frequencies
from convert.errors import ConvertError
from convert.runtimes.base import Runtime, max_abs_diff, mean_kl, register_runtime
from convert.runtimes.readers import MLX_SOURCE

log = logging.getLogger(__name__)

INSTALL_HINT = "pip install 'dprope[mlx]' (mlx[cpu] and mlx-lm on Linux; `make setup` installs them)"
# float32 on both sides: summation order only (tiny models ~3e-5, SmolLM2-135M ~1e-3 measured)
MLX_MAX_ABS = 1e-2
MLX_MAX_KL = 1e-5


def mlx_version() -> str | None:
    """The mlx-lm version when mlx and mlx-lm import (the CPU or Metal backend), else None."""
    if importlib.util.find_spec("mlx_lm") is None or importlib.util.find_spec("mlx") is None:
        return None
    try:
        import mlx.core  # noqa: F401
        import mlx_lm
    except Exception as e:  # a wheel for another platform, a missing shared library
        log.info("mlx-lm is installed but does not import (%s)", e)
        return None
    return getattr(mlx_lm, "__version__", "unknown")


def _require():
    if mlx_version() is None:
        raise ConvertError(f"mlx-lm is not importable here: {INSTALL_HINT}")
    import mlx.core as mx

    return mx


def load_mlx(path: Path):
    """The model mlx-lm builds from ``path`` (config.json + model*.safetensors), in float32 like the reference."""
    mx = _require()
    from mlx_lm.utils import load_model

    try:
        model, _ = load_model(Path(path))
    except (ValueError, FileNotFoundError) as e:
        raise ConvertError(f"mlx-lm could not load {path}: {e}") from None
    model.set_dtype(mx.float32)
    return model


def _layers(model):
    inner = getattr(model, "model", model)
    layers = getattr(inner, "layers", None)
    if not layers:
        raise ConvertError("the MLX model has no decoder layers where mlx-lm's Llama/Qwen2 models keep them")
    return layers


def rope_of(model) -> dict:
    """What mlx-lm's rotary module does: its class, inv_freq (1 / its `_freqs`), the multiplier it applies to q/k."""
    # the first layer the model's scaling applies to: Gemma 3's sliding layers (``is_sliding`` in
    # mlx_lm/models/gemma3_text.py) keep their own plain RoPE
    layer = next((x for x in _layers(model) if not getattr(x.self_attn, "is_sliding", False)), _layers(model)[0])
    rope = layer.self_attn.rope
    kind = type(rope).__name__
    explicit = mlx_rope_frequencies(rope)
    if explicit is not None:  # SuScaledRoPE, Llama3RoPE, YarnRoPE: explicit frequencies
        freqs, scale = explicit
        inv = 1.0 / np.array(freqs, dtype=np.float64)
        scale = float(scale or 1.0)
        return {"kind": kind, "inv_freq": inv.astype(np.float32), "scale": scale}
    dims, base = int(rope.dims), float(rope.base or 10000.0)  # nn.RoPE: theta^(-2i/d), positions x scale
    inv = float(getattr(rope, "scale", 1.0)) * base ** (-np.arange(0, dims, 2, dtype=np.float64) / dims)
    return {"kind": kind, "inv_freq": inv.astype(np.float32), "scale": 1.0}


class _PlacedCache:
    """Stands in for mlx-lm's KVCache so a sequence starts at ``start`` with no earlier tokens: the rotary offset is
    ``start`` and attention is causal over the new tokens only (what llama.cpp's n_past and transformers'
    position_ids do in the other checks)."""

    def __init__(self, start: int):
        self.offset = int(start)

    def update_and_fetch(self, keys, values):
        self.offset += keys.shape[2]
        return keys, values

    def make_mask(self, n, return_array=False, window_size=None, **_):
        if n == 1:
            return None
        if return_array or window_size is not None:
            import mlx.core as mx

            i = mx.arange(n)
            m = i[:, None] >= i[None]
            return m if window_size is None else m & (i[:, None] < i[None] + window_size)
        return "causal"


def mlx_logits(model, token_ids: Sequence[int], start_pos: int = 0) -> np.ndarray:
    """Logits [n_tokens, vocab] (float32) of one sequence at positions start_pos.. ."""
    mx = _require()
    ids = mx.array([list(map(int, token_ids))])
    cache = [_PlacedCache(start_pos) for _ in _layers(model)] if start_pos else None
    out = model(ids, cache=cache)
    mx.eval(out)
    return np.array(out[0].astype(mx.float32))


def check_mlx(target: Path, exp: dict, report, windows: list[tuple[str, int, list[int], np.ndarray]],
              hf_dir: Path | None = None) -> dict:
    """The ``mlx-parity`` check of ``target`` (the portable copy, or the HF directory) against the transformers
    reference: ``windows`` holds (name, first position, token ids, reference logits).  The rotary module MLX built
    is compared with the baked factors and temperature first, so a failure says why, then the logits."""
    from convert.runtimes.readers import config_temperature, longrope_default_scale, qk_fold
    from convert.arch import read_config

    version = mlx_version()
    name = f"{Path(target).name} (mlx-lm {version})" if version else Path(target).name
    if version is None:
        report.add("mlx-parity", Path(target).name, True, f"skipped: mlx-lm not installed ({INSTALL_HINT})",
                   skipped=True)
        return {"skipped": True}
    cfg = read_config(target)
    t0 = time.perf_counter()
    rt = MLXRuntime(target)
    load_s = time.perf_counter() - t0
    rope = rope_of(rt.model)
    fold = qk_fold(cfg) / qk_fold(exp["cfg"])  # what this copy carries in q/k beyond the reference
    want_scale = exp["temperature"] / fold
    want_inv = (exp["plain"] / exp["long"]).astype(np.float32)
    problems = []
    if rope["kind"] == "RoPE":
        rs = cfg.get("rope_scaling")
        problems.append("MLX-lm builds plain RoPE: " + (
            "config.json has no rope_scaling (mlx-lm reads rope_scaling, not rope_parameters)" if not rs else
            f"rope_scaling type {rs.get('type')!r} / rope_type {rs.get('rope_type')!r} is not longrope for it"))
    elif rope["inv_freq"].shape != want_inv.shape or not np.allclose(rope["inv_freq"], want_inv, rtol=1e-5, atol=0):
        rel = (float(np.max(np.abs(rope["inv_freq"] / want_inv - 1))) if rope["inv_freq"].shape == want_inv.shape
               else float("nan"))
        problems.append(f"MLX-lm's {rope['kind']} frequencies are not plain / long factors (max rel {rel:.3g})")
    if rope["kind"] != "RoPE" and not math.isclose(rope["scale"], want_scale, rel_tol=1e-5, abs_tol=1e-7):
        rs = cfg.get("rope_scaling") or {}
        lm = rs.get("long_mscale")
        default = longrope_default_scale(int(cfg.get("max_position_embeddings") or 1),
                                         int(rs.get("original_max_position_embeddings") or 1))
        why = (f"mlx-lm {version} reads no attention_factor" if lm is None else
               f"long_mscale {float(lm):.6g} != temperature" if not math.isclose(float(lm), want_scale, rel_tol=1e-6)
               else f"mlx-lm {version} does not pass long_mscale to SuScaledRoPE and reads no attention_factor")
        if math.isclose(rope["scale"], default, rel_tol=1e-6):
            why += f"; it applies its default sqrt(1 + ln s / ln L) = {default:.6g}"
        problems.append(f"MLX applies cos/sin scale {rope['scale']:.6g}, config temperature {want_scale:.6g}: {why}. "
                        "Load the portable copy `dprope export` writes (hf-portable/: the default temperature in "
                        "config.json, the rest folded into q/k)")
    own_short = (exp["cfg"].get("dprope") or {}).get("base_rope_type") == "longrope"  # Phi-3: the base's own
    if not np.array_equal(exp["short"], exp["long"]) and rope["kind"] != "RoPE" and not own_short:
        problems.append("MLX uses the long factors at every length but this checkpoint's short factors differ: "
                        "inside the original window MLX runs the long ones where transformers runs the short; "
                        "bake with --short-factor same for MLX")
    out: dict = {"mlx_lm": version, "rope": rope["kind"], "scale": rope["scale"], "qk_fold": fold,
                 "load_s": round(load_s, 3)}
    bad_numbers = []
    for where, start, ids, ref in windows:
        t1 = time.perf_counter()
        got = rt.logits(ids, start)
        kl, mad = mean_kl(ref, got), max_abs_diff(ref, got)
        out[where] = {"start": start, "tokens": len(ids), "mean_kl": kl, "max_abs_dlogit": mad,
                      "seconds": round(time.perf_counter() - t1, 3)}
        if kl > MLX_MAX_KL:
            bad_numbers.append(f"{where}: mean KL {kl:.3g} > {MLX_MAX_KL:g}")
        if mad > MLX_MAX_ABS:
            bad_numbers.append(f"{where}: max abs dlogit {mad:.3g} > {MLX_MAX_ABS:g}")
    numbers = ", ".join(f"{w}: KL {out[w]['mean_kl']:.2g}, max abs dlogit {out[w]['max_abs_dlogit']:.2g}"
                        for w, *_ in windows)
    ok = not problems and not bad_numbers
    if ok:
        how = f"cos/sin x {rope['scale']:.6g}" + (f" x q/k {fold:.6g}" if not math.isclose(fold, 1.0) else "")
        true_t = exp["temperature"] * qk_fold(exp["cfg"])
        detail = f"{rope['kind']}: inv_freq = plain / long factors, {how} = temperature {true_t:.6g}; {numbers}"
        if hf_dir is not None and Path(hf_dir) != Path(target):
            hf_cfg = read_config(hf_dir)
            rs = hf_cfg.get("rope_scaling") or {}
            d = longrope_default_scale(int(hf_cfg["max_position_embeddings"]),
                                       int(rs.get("original_max_position_embeddings") or 1))
            detail += (f" (MLX-lm on {Path(hf_dir).name}/ would apply {d:.6g} for temperature "
                       f"{config_temperature(hf_cfg):.6g}: load this copy)")
    else:
        detail = "; ".join(problems + (bad_numbers or [numbers]))
    report.add("mlx-parity", name, ok, detail, **out)
    return out


@register_runtime
class MLXRuntime(Runtime):
    """A HF directory in MLX-lm (float32, as the parity reference)."""

    name = "mlx"
    formats = ("hf",)
    reads = ("config.json rope_scaling: type first, then rope_type; longrope: long_factor, "
             "original_max_position_embeddings (short_factor, short_mscale, long_mscale and attention_factor unread)",
             "rope_theta", "max_position_embeddings")
    source = MLX_SOURCE

    def __init__(self, path: Path):
        super().__init__(path)
        self.model = load_mlx(path)

    def logits(self, token_ids: Sequence[int], start_pos: int = 0) -> np.ndarray:
        return mlx_logits(self.model, token_ids, start_pos)

    def generate(self, token_ids: Sequence[int], max_new_tokens: int) -> list[int]:
        """Greedy with mlx-lm's own KV cache (mlx_lm.models.cache.make_prompt_cache)."""
        mx = _require()
        from mlx_lm.models.cache import make_prompt_cache

        cache = make_prompt_cache(self.model)
        x = mx.array([list(map(int, token_ids))])
        eos = set(_eos_ids(self.path))
        out: list[int] = []
        while len(out) < int(max_new_tokens):
            logits = self.model(x, cache=cache)[0, -1]
            tok = int(mx.argmax(logits).item())
            if tok in eos:
                break
            out.append(tok)
            x = mx.array([[tok]])
        return out

    def close(self) -> None:
        self.model = None


def _eos_ids(path: Path) -> list[int]:
    from convert.arch import read_config

    eos = read_config(path).get("eos_token_id")
    return [] if eos is None else [int(e) for e in (eos if isinstance(eos, list) else [eos])]
