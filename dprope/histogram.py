"""Rotary-angle histograms and the divergence between them (Wu et al., EMNLP 2024, as its reference code computes them).

Angles are computed in float32 exactly like a real RoPE, ``(m * theta_i) mod 2*pi``, with the same float32
operations torch applies (the position cast to float32, a float32 product, ``fmod`` with the sign rule of
``torch.remainder``), so the bin of every (pair, position) is the same as the reference implementation's
(tests/reference_loop.py is that oracle).  The histogram is built with ``bincount`` over position chunks: memory is
bounded by ``chunk_elems`` whatever the length (a 2M-token target never materialises a [pairs, 2M] array).
"""

from __future__ import annotations

import math

import numpy as np

from .constants import PSEUDO_COUNT
from .errors import DPRoPEError

DEFAULT_CHUNK_ELEMS = 1 << 18  # (pair, position) cells per step: 3 MB of reused buffers

_TWO_PI = np.float32(math.pi * 2)  # torch casts the python float 2*pi to the tensor's float32


def _check_bins(bins: int) -> None:
    if int(bins) != bins or bins < 2:
        raise DPRoPEError(f"bins must be an integer >= 2, got {bins}")


def angle_histogram(inv_freq, length: int, bins: int = 360, chunk_elems: int = DEFAULT_CHUNK_ELEMS) -> np.ndarray:
    """Counts of rotary angles per bin for positions 0..length-1.

    inv_freq: float32 [n_pairs]; returns int64 [n_pairs, bins].
    """
    from .freqs import as_array

    _check_bins(bins)
    if length < 1:
        raise DPRoPEError(f"length must be >= 1, got {length}")
    inv_freq = as_array(inv_freq)
    n_pairs = inv_freq.size
    counts = np.zeros(n_pairs * bins, dtype=np.int64)
    step = max(1, min(length, chunk_elems // n_pairs))
    offsets = (np.arange(n_pairs, dtype=np.int64) * bins)[:, None]
    to_bin = np.float32(bins / (math.pi * 2))  # a python float applied to float32 angles: cast to float32
    col = inv_freq[:, None]
    # reused buffers: no allocation per chunk, and chunks small enough to stay in cache
    fbuf = np.empty((n_pairs, step), dtype=np.float32)
    ibuf = np.empty((n_pairs, step), dtype=np.int64)
    for start in range(0, length, step):
        n = min(step, length - start)
        angles, idx = fbuf[:, :n], ibuf[:, :n]
        pos = np.arange(start, start + n, dtype=np.int64).astype(np.float32)  # int64 * float32 -> float32, as torch
        np.multiply(col, pos, out=angles)
        np.fmod(angles, _TWO_PI, out=angles)  # angles >= 0: torch.remainder's fmod, without its sign fix-up
        np.multiply(angles, to_bin, out=angles)
        idx[...] = angles  # truncation == floor here: angles are >= 0
        # float32 rounding can land an angle just below 2*pi in bin `bins`; it belongs to the last bin.
        np.minimum(idx, bins - 1, out=idx)
        idx += offsets
        counts += np.bincount(idx.ravel(), minlength=n_pairs * bins)
    return counts.reshape(n_pairs, bins)


def angle_distribution(counts: np.ndarray, length: int) -> np.ndarray:
    """Probabilities per bin, float32, with the reference's pseudo-count: (n + 2^-14) / length."""
    # fl32(n + 2^-14) equals the reference's n successive float32 increments of a bin that started at 2^-14.
    return ((np.asarray(counts).astype(np.float32) + np.float32(PSEUDO_COUNT)) / np.float32(length)).astype(np.float32)


def kl_divergence(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    """KL(P || Q) per row, summed over bins, in nats (float64).  p, q: [..., bins]."""
    p64, q64 = np.asarray(p, dtype=np.float64), np.asarray(q, dtype=np.float64)
    return (p64 * (np.log(p64) - np.log(q64))).sum(-1)


def coverage_distribution(inv_freq, length: int, bins: int = 360) -> np.ndarray:
    """Aliasing-free angle density: the share of continuous positions t in [0, length) whose angle t*theta mod 2*pi
    falls in each bin, plus the reference's pseudo-count.  float32 [n_pairs, bins].

    The sampled histogram of integer positions is a comb whenever 2*pi/theta is close to a ratio of small integers,
    and two combs that barely differ in where their teeth fall can score a large divergence although the model sees
    the same range of angles.  The continuous coverage is what the sampled histogram tends to as positions get
    dense: ``floor(n)`` whole turns spread evenly plus the partial turn [0, 2*pi*frac(n)), with n = length*theta/2pi
    turns.  Closed form, O(pairs x bins), whatever the length.
    """
    from .freqs import as_array

    _check_bins(bins)
    if length < 1:
        raise DPRoPEError(f"length must be >= 1, got {length}")
    theta = as_array(inv_freq, np.float64)[:, None]  # [n_pairs, 1]
    turns = length * theta / (2 * math.pi)
    whole = np.floor(turns)
    part = turns - whole  # fraction of the last turn, in [0, 1)
    lo = np.arange(bins, dtype=np.float64)[None, :] / bins  # bin starts, in turns
    overlap = np.clip(part - lo, 0, 1.0 / bins)  # [n_pairs, bins], in turns
    share = (whole / bins + overlap) / turns
    return ((share * length + PSEUDO_COUNT) / length).astype(np.float32)
