"""Rotary-angle histograms and the divergence between them (Wu et al., EMNLP 2024, as its reference code computes them).

Angles are computed in float32 exactly like a real RoPE, ``(m * theta_i) mod 2*pi`` with torch's own
operators, so the bin of every (pair, position) is the same as the reference implementation's.  The
histogram is built with ``bincount`` over position chunks: memory is bounded by ``chunk_elems`` whatever the
length (a 2M-token target never materialises a [pairs, 2M] tensor).
"""

from __future__ import annotations

import torch

from .constants import PSEUDO_COUNT
from .errors import DPRoPEError

DEFAULT_CHUNK_ELEMS = 1 << 18  # (pair, position) cells per step: 3 MB of reused buffers


def _check_bins(bins: int) -> None:
    if int(bins) != bins or bins < 2:
        raise DPRoPEError(f"bins must be an integer >= 2, got {bins}")


def angle_histogram(
    inv_freq: torch.Tensor, length: int, bins: int = 360, chunk_elems: int = DEFAULT_CHUNK_ELEMS
) -> torch.Tensor:
    """Counts of rotary angles per bin for positions 0..length-1.

    inv_freq: float32 [n_pairs]; returns int64 [n_pairs, bins].
    """
    _check_bins(bins)
    if length < 1:
        raise DPRoPEError(f"length must be >= 1, got {length}")
    inv_freq = inv_freq.to(torch.float32).flatten()
    n_pairs = inv_freq.numel()
    counts = torch.zeros(n_pairs * bins, dtype=torch.int64)
    step = max(1, min(length, chunk_elems // n_pairs))
    offsets = (torch.arange(n_pairs, dtype=torch.int64) * bins).unsqueeze(1).expand(n_pairs, step)
    to_bin = bins / (torch.pi * 2)  # python float, applied to float32 angles like the reference
    col = inv_freq.unsqueeze(1)
    positions = torch.arange(length, dtype=torch.int64)
    # reused buffers: no allocation per chunk, and chunks small enough to stay in cache
    fbuf = torch.empty(n_pairs, step, dtype=torch.float32)
    ibuf = torch.empty(n_pairs, step, dtype=torch.int64)
    for start in range(0, length, step):
        n = min(step, length - start)
        angles, idx = fbuf[:, :n], ibuf[:, :n]
        torch.mul(col, positions[start : start + n], out=angles)  # float32, as int64 * float32 promotes
        torch.remainder(angles, torch.pi * 2, out=angles)
        angles.mul_(to_bin)
        idx.copy_(angles)  # truncation == floor here: angles are >= 0
        # float32 rounding can land an angle just below 2*pi in bin `bins`; it belongs to the last bin.
        idx.clamp_(max=bins - 1)
        idx.add_(offsets[:, :n])
        counts += torch.bincount(idx.flatten(), minlength=n_pairs * bins)
    return counts.view(n_pairs, bins)


def angle_distribution(counts: torch.Tensor, length: int) -> torch.Tensor:
    """Probabilities per bin, float32, with the reference's pseudo-count: (n + 2^-14) / length."""
    # fl32(n + 2^-14) equals the reference's n successive float32 increments of a bin that started at 2^-14.
    return (counts.to(torch.float32) + PSEUDO_COUNT) / length


def kl_divergence(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """KL(P || Q) per row, summed over bins, in nats (float64).  p, q: [..., bins]."""
    p64, q64 = p.double(), q.double()
    return (p64 * (p64.log() - q64.log())).sum(-1)



def coverage_distribution(inv_freq: torch.Tensor, length: int, bins: int = 360) -> torch.Tensor:
    """Aliasing-free angle density: the share of continuous positions t in [0, length) whose angle t*theta mod 2*pi
    falls in each bin, plus the reference's pseudo-count.  float32 [n_pairs, bins].

    The sampled histogram of integer positions is a comb whenever 2*pi/theta is close to a ratio of small integers,
    and two combs that barely differ in where their teeth fall can score a large divergence although the model sees
    the same range of angles.  The continuous coverage is what the sampled histogram tends to as positions get
    dense: ``floor(n)`` whole turns spread evenly plus the partial turn [0, 2*pi*frac(n)), with n = length*theta/2pi
    turns.  Closed form, O(pairs x bins), whatever the length.
    """
    _check_bins(bins)
    if length < 1:
        raise DPRoPEError(f"length must be >= 1, got {length}")
    theta = inv_freq.double().flatten().unsqueeze(1)  # [n_pairs, 1]
    turns = length * theta / (2 * torch.pi)
    whole = torch.floor(turns)
    part = turns - whole  # fraction of the last turn, in [0, 1)
    lo = torch.arange(bins, dtype=torch.float64).unsqueeze(0) / bins  # bin starts, in turns
    overlap = (part - lo).clamp(0, 1.0 / bins)  # [n_pairs, bins], in turns
    share = (whole / bins + overlap) / turns
    return ((share * length + PSEUDO_COUNT) / length).to(torch.float32)
