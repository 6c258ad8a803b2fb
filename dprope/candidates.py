"""Candidate RoPE scalings, each a function from a RopeContext to per-pair factors.

A factor lambda_i divides the pair's frequency: theta'_i = theta_i / lambda_i (the convention of
transformers' ``longrope`` ext factors and llama.cpp's ``rope_freqs`` tensor).  New candidates register
with :func:`register_candidate`; the order of a candidate list decides ties (first wins).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

from .constants import DEFAULT_CANDIDATES  # noqa: F401  (re-exported)
from .errors import DPRoPEError
from .freqs import RopeContext

FactorFn = Callable[[RopeContext], "np.ndarray | Sequence[float]"]


@dataclass(frozen=True)
class Candidate:
    name: str
    fn: FactorFn
    description: str

    def factors(self, ctx: RopeContext) -> np.ndarray:
        """Per-pair factors as float32 [n_pairs], validated."""
        from .freqs import as_array

        f = as_array(self.fn(ctx))
        if f.size != ctx.n_pairs:
            raise DPRoPEError(
                f"candidate '{self.name}' returned {f.size} factors, expected one per rotary pair "
                f"({ctx.n_pairs})"
            )
        if not bool(np.isfinite(f).all()) or not bool((f > 0).all()):
            raise DPRoPEError(f"candidate '{self.name}' returned factors that are not finite and > 0")
        return f


_REGISTRY: dict[str, Candidate] = {}
_ALIASES: dict[str, str] = {}



def register_candidate(name: str, description: str = "", aliases: Sequence[str] = ()):
    """Decorator: register ``fn(ctx) -> factors`` under ``name`` (and optional aliases)."""

    def deco(fn: FactorFn) -> FactorFn:
        key = name.lower()
        if key in _REGISTRY or key in _ALIASES:
            raise DPRoPEError(f"candidate '{name}' is already registered")
        _REGISTRY[key] = Candidate(key, fn, description or (fn.__doc__ or "").strip().split("\n")[0])
        for a in aliases:
            _ALIASES[a.lower()] = key
        return fn

    return deco


def unregister_candidate(name: str) -> None:
    key = name.lower()
    _REGISTRY.pop(key, None)
    for a in [a for a, k in _ALIASES.items() if k == key]:
        del _ALIASES[a]


def get_candidate(name: str) -> Candidate:
    key = _ALIASES.get(name.lower(), name.lower())
    try:
        return _REGISTRY[key]
    except KeyError:
        raise DPRoPEError(
            f"unknown candidate '{name}'; registered: {', '.join(available_candidates())} "
            "(add your own with dprope.register_candidate)"
        ) from None


def available_candidates() -> list[str]:
    return list(_REGISTRY)


def _need_theta(ctx: RopeContext, what: str) -> float:
    if ctx.rope_theta is None:
        raise DPRoPEError(f"candidate '{what}' is defined on the RoPE base: pass rope_theta")
    return float(ctx.rope_theta)


@register_candidate("extrapolation", "keep the pre-trained frequency (factor 1)", aliases=("extrap", "none"))
def extrapolation(ctx: RopeContext) -> np.ndarray:
    return np.ones(ctx.n_pairs, dtype=np.float32)


@register_candidate("interpolation", "position interpolation, PI (factor s)", aliases=("pi", "linear"))
def interpolation(ctx: RopeContext) -> np.ndarray:
    return np.full(ctx.n_pairs, ctx.scale, dtype=np.float32)


@register_candidate("ntk", "NTK-aware static scaling (factor s^(2i/(d-2)))", aliases=("ntk-aware",))
def ntk(ctx: RopeContext) -> np.ndarray:
    d = ctx.head_dim
    i = np.arange(ctx.n_pairs, dtype=np.float64)
    return (ctx.scale ** (2.0 * i / (d - 2))).astype(np.float32) if d > 2 else np.ones(1, dtype=np.float32)


def yarn_ramp(ctx: RopeContext, beta_fast: float = 32.0, beta_slow: float = 1.0) -> np.ndarray:
    """YaRN's extrapolation weight gamma per pair, float32 [n_pairs]: 1 keeps the frequency (fast pairs), 0 is PI
    (slow pairs), linear between the official truncated correction range (jquesnelle/yarn, scaled_rope)."""
    b = _need_theta(ctx, "yarn")
    d, L = ctx.head_dim, ctx.original_length

    def corr(r: float) -> float:
        return (d * math.log(L / (r * 2 * math.pi))) / (2 * math.log(b))

    low = max(math.floor(corr(beta_fast)), 0)
    high = min(math.ceil(corr(beta_slow)), d - 1)
    if low == high:
        high += 0.001  # the official code's guard against a zero-width ramp
    ramp = np.clip((np.arange(ctx.n_pairs, dtype=np.float32) - np.float32(low)) / np.float32(high - low), 0, 1)
    return (np.float32(1) - ramp).astype(np.float32)  # 1: extrapolate (high frequency), 0: interpolate


def yarn_factors(ctx: RopeContext, beta_fast: float = 32.0, beta_slow: float = 1.0) -> np.ndarray:
    """YaRN's per-pair factors with the official ramp (truncated correction range)."""
    gamma = yarn_ramp(ctx, beta_fast, beta_slow)
    one = np.float32(1)
    return (one / (gamma + (one - gamma) / np.float32(ctx.scale))).astype(np.float32)


@register_candidate("yarn", "YaRN ramp between extrapolation and PI (beta_fast 32, beta_slow 1)")
def yarn(ctx: RopeContext) -> np.ndarray:
    return yarn_factors(ctx)


def llama3_factors(ctx: RopeContext, low_freq_factor: float = 1.0, high_freq_factor: float = 4.0) -> np.ndarray:
    """Llama 3.1's wavelength-banded factors."""
    L, s = ctx.original_length, ctx.scale
    wavelen = 2 * math.pi / ctx.inv_freq.astype(np.float64)
    k = (L / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    smooth = 1.0 / ((1 - k) / s + k)
    f = np.where(wavelen > L / low_freq_factor, s, 1.0)
    medium = (wavelen <= L / low_freq_factor) & (wavelen >= L / high_freq_factor)
    return np.where(medium, smooth, f).astype(np.float32)


@register_candidate("llama3", "Llama 3.1 banded scaling (low_freq_factor 1, high_freq_factor 4)")
def llama3(ctx: RopeContext) -> np.ndarray:
    return llama3_factors(ctx)
