"""Base rotary frequencies and the context every candidate method sees."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .errors import DPRoPEError


def base_inv_freq(rope_theta: float, head_dim: int) -> torch.Tensor:
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
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim
    return 1.0 / (rope_theta ** exponents)


def check_inv_freq(inv_freq) -> torch.Tensor:
    """Validate and return inverse frequencies as a 1-D float32 tensor."""
    t = torch.as_tensor(inv_freq, dtype=torch.float32).flatten().clone()
    if t.numel() < 1:
        raise DPRoPEError("inv_freq is empty: pass one inverse frequency per rotary pair")
    if not bool(torch.isfinite(t).all()):
        bad = torch.nonzero(~torch.isfinite(t)).flatten().tolist()
        raise DPRoPEError(f"inv_freq has non-finite values at pairs {bad[:8]}: check rope_theta and the factors")
    if not bool((t > 0).all()):
        bad = torch.nonzero(t <= 0).flatten().tolist()
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

    inv_freq: effective pre-trained inverse frequencies, float32 [n_pairs]
    rope_theta: the base b (needed by YaRN / NTK / llama3 shapes that are defined on b)
    original_length: L, the pre-training window
    target_length: L', the window to extend to
    """

    inv_freq: torch.Tensor
    rope_theta: float | None
    original_length: int
    target_length: int

    @property
    def n_pairs(self) -> int:
        return int(self.inv_freq.numel())

    @property
    def head_dim(self) -> int:
        return 2 * self.n_pairs

    @property
    def scale(self) -> float:
        return self.target_length / self.original_length
