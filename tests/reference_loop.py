"""A faithful re-implementation of the DPRoPE reference code's double loop (Wu et al., EMNLP 2024).

Same float32 operations, the same per-element Python loop over (pair, position), the same pseudo-count and
the same KL call (``F.kl_div(Q.log(), P, reduction='mean')``).  Used as the oracle in tests (small cases) and as
the peer in ``bench/factors.py``.  Unlike the original it accepts a non-integer scale.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F


def _inv_freq(rope_theta: float, head_dim: int) -> torch.Tensor:
    return 1 / (rope_theta ** (torch.arange(0, head_dim, 2).float() / head_dim))


def reference_distribution(inv_freq: torch.Tensor, seq_len: int, intervals: int) -> torch.Tensor:
    n = inv_freq.numel()
    all_inv_freqs = inv_freq.repeat(seq_len, 1).transpose(0, 1)
    all_positions = torch.arange(0, seq_len).repeat(n, 1)
    all_angles = (all_inv_freqs * all_positions) % (torch.pi * 2)
    counts = torch.full((n, intervals), torch.finfo(torch.float16).tiny)
    for idx in range(all_angles.shape[0]):
        for jdx in range(all_angles.shape[1]):
            position_map = torch.floor((intervals / (torch.pi * 2)) * all_angles[idx][jdx])
            counts[idx][int(position_map)] += 1
    return counts / seq_len


def reference_dprope(rope_theta: float, head_dim: int, original: int, target: int, intervals: int = 360):
    """Returns (factors, per-candidate similarity [2, pairs]) for extrapolation vs interpolation, argmin."""
    scale = target / original
    if scale == int(scale):
        scale = int(scale)
    base = _inv_freq(rope_theta, head_dim)
    orig = reference_distribution(base, original, intervals)
    sims, facs = [], []
    for inv, fac in ((base, torch.ones(head_dim // 2)), (base / scale, torch.full((head_dim // 2,), scale))):
        dist = reference_distribution(inv, target, intervals)
        sim = torch.zeros(head_dim // 2)
        with warnings.catch_warnings():  # the reference's reduction="mean", kept as it is; torch notes its meaning
            warnings.simplefilter("ignore", UserWarning)
            for idx in range(head_dim // 2):
                sim[idx] = F.kl_div(dist[idx].log(), orig[idx], reduction="mean")
        sims.append(sim)
        facs.append(fac.float())
    sims_t = torch.stack(sims)
    choice = torch.argmin(sims_t, dim=0)
    factors = torch.stack(facs)[choice, torch.arange(head_dim // 2)]
    return factors, sims_t
