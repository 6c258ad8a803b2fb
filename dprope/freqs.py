"""Base rotary frequencies and the context every candidate method sees.

The engine computes with NumPy, not torch: extending a GGUF in place, listing methods or computing factors needs no
deep-learning framework, so those commands start in a fraction of a second.  Arrays are float32 where a real RoPE
is float32 and computed by the same float32 operations torch applies; NumPy's float32 ``pow`` and torch's vectorised
one (SLEEF's, not correctly rounded) differ by at most 2 ulp in a few base frequencies, and the angle histograms are
torch's bin for bin (tests/test_numpy_engine.py pins both)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .errors import DPRoPEError


def base_inv_freq(rope_theta: float, head_dim: int) -> np.ndarray:
    """Plain RoPE inverse frequencies, float32, computed exactly as transformers does.

    theta_i = 1 / (b ** (arange(0, d, 2).float() / d))   # [head_dim // 2]
    """
    if head_dim < 2 or head_dim % 2:
        raise DPRoPEError(
            f"head_dim must be a positive even number, got {head_dim}; "
            "rotary embeddings rotate pairs of dimensions"
        )
    if not (math.isfinite(rope_theta) and rope_theta > 1.0):
        raise DPRoPEError(f"rope_theta must be a finite number > 1, got {rope_theta}")
    # float32 throughout, as torch evaluates `1.0 / (b ** (arange(0, d, 2).float() / d))` (python scalars are cast to
    # the tensor's float32)
    exponents = np.arange(0, head_dim, 2, dtype=np.int64).astype(np.float32) / np.float32(head_dim)
    return (np.float32(1.0) / (np.float32(rope_theta) ** exponents)).astype(np.float32)


def as_array(values, dtype=np.float32) -> np.ndarray:
    """A 1-D NumPy copy of ``values`` (a list, an array, or a CPU torch tensor) in ``dtype``."""
    if hasattr(values, "detach"):  # a torch tensor: through its list, never importing torch here
        values = values.detach().cpu().tolist()
    return np.array(values, dtype=dtype).reshape(-1)


def check_inv_freq(inv_freq) -> np.ndarray:
    """Validate and return inverse frequencies as a 1-D float32 array."""
    t = as_array(inv_freq)
    if t.size < 1:
        raise DPRoPEError("inv_freq is empty: pass one inverse frequency per rotary pair")
    if not bool(np.isfinite(t).all()):
        bad = np.flatnonzero(~np.isfinite(t)).tolist()
        raise DPRoPEError(f"inv_freq has non-finite values at pairs {bad[:8]}: check rope_theta and the factors")
    if not bool((t > 0).all()):
        bad = np.flatnonzero(t <= 0).tolist()
        raise DPRoPEError(f"inv_freq must be > 0; pairs {bad[:8]} are not")
    return t


def check_target_length(target_length: int, original_length: int, error: type[Exception] = DPRoPEError) -> None:
    """Refuse a target that does not extend the window (the one check and message for every caller; ``error``: the
    exception type the caller's layer raises)."""
    if int(target_length) <= int(original_length):
        raise error(f"target length {target_length} is not longer than the model's window {original_length}: pass a "
                    "target length above it (--target-length, or target_length in a recipe)")


@dataclass(frozen=True)
class RopeContext:
    """Everything a candidate method needs to produce its per-pair factors.

    inv_freq: effective pre-trained inverse frequencies, float32 [n_pairs] (a NumPy array; anything array-like is
        converted)
    rope_theta: the base b (needed by YaRN / NTK / llama3 shapes that are defined on b)
    original_length: L, the pre-training window
    target_length: L', the window to extend to
    """

    inv_freq: np.ndarray
    rope_theta: float | None
    original_length: int
    target_length: int

    def __post_init__(self) -> None:
        if not isinstance(self.inv_freq, np.ndarray) or self.inv_freq.dtype != np.float32:
            object.__setattr__(self, "inv_freq", as_array(self.inv_freq))

    @property
    def n_pairs(self) -> int:
        return int(self.inv_freq.size)

    @property
    def head_dim(self) -> int:
        return 2 * self.n_pairs

    @property
    def scale(self) -> float:
        return self.target_length / self.original_length
