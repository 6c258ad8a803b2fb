"""The YaRN parametrisation closest to given per-pair factors.

Some runtimes cannot carry per-pair factors for some architectures: llama.cpp's graphs for qwen2, qwen3 and gemma3
pass no factor tensor to ``ggml_rope_ext`` (ggml-org/llama.cpp src/models/<arch>.cpp), but every graph runs YaRN from
four numbers a GGUF carries (``rope.scaling.type = yarn``, ``rope.scaling.factor`` f, ``rope.scaling.original_context
_length`` L_o, ``rope.freq_base`` b; beta_fast 32 and beta_slow 1 are not read from the file).  YaRN's factor of pair i
(Peng et al. 2023; llama.cpp ggml/src/ggml.c ``ggml_rope_yarn_corr_dims`` and ggml-cpu/ops.cpp ``rope_yarn``;
transformers modeling_rope_utils.py ``_compute_yarn_parameters``, identical):

    corr(r) = d ln(L_o / (2 pi r)) / (2 ln b),  low = max(floor(corr(32)), 0),  high = min(ceil(corr(1)), d - 1)
    ramp_i = clamp((i - low) / max(high - low, 0.001), 0, 1),   m_i = 1 - ramp_i   (the extrapolated share)
    lambda_i = 1 / ((1 - m_i) / f + m_i)

:func:`fit_yarn` picks (f, L_o) minimising the squared error of ln lambda against the wanted factors' logarithms
(factors act multiplicatively on frequencies, so a factor 2 too high and one 2 too low weigh the same), over every
integer L_o with f = target / L_o (the pair transformers and llama.cpp read consistently).  Pure NumPy; no model is
run.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .errors import DPRoPEError

BETA_FAST, BETA_SLOW = 32.0, 1.0  # what llama.cpp and transformers use when nothing overrides them


@dataclass(frozen=True)
class YarnFit:
    factor: float  # f: rope.scaling.factor / rope_scaling["factor"]
    original_length: int  # L_o: rope.scaling.original_context_length / original_max_position_embeddings
    factors: np.ndarray  # the fitted per-pair factors, float64 [n_pairs]
    rms_log_error: float  # sqrt(mean (ln fitted - ln wanted)^2)
    max_log_error: float

    def to_dict(self) -> dict:
        return {"factor": self.factor, "original_length": self.original_length,
                "factors": [float(x) for x in self.factors], "rms_log_error": self.rms_log_error,
                "max_log_error": self.max_log_error}


def _ramp_bounds(head_dim: int, rope_theta: float, original_length: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(low, high) correction dims for each L_o, computed in float32 as llama.cpp does (logf), [n_L]."""
    lo_len = original_length.astype(np.float32)
    d, lb = np.float32(head_dim), np.float32(2.0) * np.log(np.float32(rope_theta))
    corr = lambda r: d * np.log(lo_len / (np.float32(r) * np.float32(2 * math.pi))) / lb  # noqa: E731
    return np.maximum(np.floor(corr(BETA_FAST)), 0), np.minimum(np.ceil(corr(BETA_SLOW)), head_dim - 1)


def _stable(head_dim: int, rope_theta: float, length: int) -> bool:
    """The correction dims come out the same in float32 (llama.cpp) and float64 (transformers) for this L_o."""
    lo32, hi32 = _ramp_bounds(head_dim, rope_theta, np.array([length]))
    corr = lambda r: head_dim * math.log(length / (r * 2 * math.pi)) / (2 * math.log(rope_theta))  # noqa: E731
    return (float(lo32[0]) == max(math.floor(corr(BETA_FAST)), 0)
            and float(hi32[0]) == min(math.ceil(corr(BETA_SLOW)), head_dim - 1))


def yarn_factors(head_dim: int, rope_theta: float, factor: float, original_length: int) -> np.ndarray:
    """YaRN's per-pair factors lambda_i, float64 [head_dim/2]."""
    lo, hi = _ramp_bounds(head_dim, rope_theta, np.array([original_length]))
    i = np.arange(head_dim // 2, dtype=np.float64)
    ramp = np.clip((i - lo[0]) / max(float(hi[0] - lo[0]), 0.001), 0, 1)
    m = 1 - ramp
    return 1.0 / ((1 - m) / float(factor) + m)


def _log_errors(lw: np.ndarray, fs: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """mean_i (ln lambda_i - lw_i)^2 for each candidate (f, low, high), [L].  The ramp depends on L_o only through
    its integer correction dims, which rise with L_o (a few dozen runs of equal dims over a 10^5-long range), so the
    candidates are taken run by run: pairs below the ramp have lambda = 1 (a constant term), pairs above it
    lambda = f (a quadratic in ln f from two sums), and only the ramp's own pairs are computed per candidate."""
    n = lw.size
    i = np.arange(n, dtype=np.float64)
    err = np.empty(fs.size)
    inv_f = 1.0 / fs
    cuts = np.flatnonzero((np.diff(lo) != 0) | (np.diff(hi) != 0)) + 1
    for a, b in zip([0, *cuts.tolist()], [*cuts.tolist(), fs.size]):
        idx = slice(a, b)
        l0, h0 = lo[a], hi[a]
        ramp = np.clip((i - l0) / max(float(h0 - l0), 0.001), 0, 1)
        below, above = ramp == 0, ramp == 1
        part = ~(below | above)
        lf = np.log(1.0 / (1.0 / fs[idx]))  # lambda of a pair above the ramp, as the full formula gives it
        e = float((lw[below] ** 2).sum()) + int(above.sum()) * lf ** 2 - 2 * lf * float(lw[above].sum()) \
            + float((lw[above] ** 2).sum())
        if part.any():  # (ln lambda - lw)^2 = (ln((1 - m) / f + m) + lw)^2, in place
            m = 1 - ramp[part]
            x = np.multiply.outer(inv_f[idx], 1 - m)
            x += m
            np.log(x, out=x)
            x += lw[part]
            np.square(x, out=x)
            e = e + x.sum(-1)
        err[idx] = e / n
    return err


def _first(values: np.ndarray, k: int) -> np.ndarray:
    """The indices of the ``k`` smallest values in order, ties by index: ``np.argsort(values, kind="stable")[:k]``
    without sorting the whole array."""
    if values.size <= k:
        return np.argsort(values, kind="stable")
    bound = np.partition(values, k - 1)[k - 1]
    idx = np.flatnonzero(values <= bound)  # every tie at the bound, so the order by index below is argsort's
    return idx[np.lexsort((idx, values[idx]))][:k]


def fit_yarn(wanted, head_dim: int, rope_theta: float, window: int, target_length: int) -> YarnFit:
    """The (f, L_o) whose YaRN factors come closest to ``wanted`` (float [head_dim/2], relative to the plain
    base b^(-2i/d)) in log space, with f x L_o = ``target_length``: transformers' YaRN reads the two as a pair
    (with max_position_embeddings = the target, modeling_rope_utils.py warns on any other ratio), and llama.cpp's
    context_length is the target.  So the search is over the integer L_o (from the target / (2 x the largest wanted
    factor) to the target), f = target / L_o.  ``window``: the model's window (reported, not constrained)."""
    w = np.asarray(wanted, dtype=np.float64).ravel()
    if w.size != head_dim // 2 or not np.all(np.isfinite(w)) or not np.all(w > 0):
        raise DPRoPEError(f"wanted factors must be {head_dim // 2} finite values > 0, got {w.size}")
    if int(target_length) <= 1:
        raise DPRoPEError(f"target_length must be > 1, got {target_length}")
    lw = np.log(w)
    fmax = max(2.0 * float(w.max()), 1.0 + 1e-6)
    lo_len = max(int(math.floor(target_length / fmax)), 2)
    lengths = np.arange(lo_len, int(target_length) + 1, dtype=np.int64)
    if lengths.size > 200_000:  # very long targets: every integer near the optimum, a geometric grid elsewhere
        lengths = np.unique(np.round(np.geomspace(lo_len, target_length, 200_000)).astype(np.int64))
    fs = float(target_length) / lengths.astype(np.float64)  # [L]
    err = _log_errors(lw, fs, *_ramp_bounds(head_dim, rope_theta, lengths))
    order = _first(err, 64)
    k = next((int(j) for j in order if _stable(head_dim, rope_theta, int(lengths[j]))), int(order[0]))
    L = int(lengths[k])
    f = float(target_length) / L
    fitted = yarn_factors(head_dim, rope_theta, f, L)
    d = np.log(fitted) - lw
    return YarnFit(f, L, fitted, float(np.sqrt((d ** 2).mean())), float(np.abs(d).max()))


# ----------------------------------------------------------------------------------------------- YaRN by a loss
def stable_length(head_dim: int, rope_theta: float, length: int, lowest: int = 2, highest: int | None = None) -> int:
    """The integer L_o nearest ``length`` (within [lowest, highest]) whose correction dims llama.cpp (float32) and
    transformers (float64) compute alike, so the two runtimes run the same YaRN from it."""
    hi = int(highest) if highest is not None else max(int(length), lowest) * 2
    length = min(max(int(length), int(lowest)), hi)
    for d in range(0, max(hi - lowest, 0) + 1):
        for c in (length - d, length + d):
            if lowest <= c <= hi and _stable(head_dim, rope_theta, c):
                return c
    return length


def scan_lengths(head_dim: int, rope_theta: float, original_length: int, target_length: int,
                 points: int = 9, low: float = 0.25, high: float = 1.25) -> list[int]:
    """The first candidates of a YaRN scan: ``points`` values of L_o spaced geometrically over [low, high] x the
    original window (L_o = the original window itself always among them: llama.cpp's own YaRN at this target, f =
    target / original), each below the target (f = target / L_o > 1) and moved to the nearest stable integer."""
    if points < 2:
        raise DPRoPEError(f"a YaRN scan needs at least 2 points, got {points}")
    if not 0 < low < 1 <= high:
        raise DPRoPEError(f"a YaRN scan's range must hold the original window: 0 < low < 1 <= high, got {low}, {high}")
    top = int(target_length) - 1
    raw = np.geomspace(low, high, points) * float(original_length)
    out = {stable_length(head_dim, rope_theta, min(int(round(v)), top), 2, top) for v in raw}
    out.add(stable_length(head_dim, rope_theta, min(int(original_length), top), 2, top))
    return sorted(out)


def refine_lengths(evaluated: dict[int, float], head_dim: int, rope_theta: float, target_length: int,
                   min_gap: float = 0.02) -> list[int]:
    """The next candidates of a YaRN scan from the losses so far (L_o -> loss): the geometric midpoints between the
    best L_o and each of its evaluated neighbours, where they lie more than ``min_gap`` (relative) apart and are not
    evaluated yet; where the best is the smallest or the largest L_o evaluated, also one geometric step past it
    (the same ratio as to its neighbour; L_o within 2 .. target - 1), so a scan whose range missed the minimum
    walks on.  Empty when the scan has converged."""
    xs = sorted(evaluated)
    b = min(xs, key=lambda L: (evaluated[L], L))
    i = xs.index(b)
    out = []
    if len(xs) >= 2 and i in (0, len(xs) - 1):
        nb = xs[1] if i == 0 else xs[-2]
        step = int(round(b * b / nb))
        lo, hi = (2, b - 1) if i == 0 else (b + 1, target_length - 1)
        if lo <= hi:
            e = stable_length(head_dim, rope_theta, min(max(step, lo), hi), lo, hi)
            if lo <= e <= hi and e not in evaluated:
                out.append(e)
    for j in (i - 1, i + 1):
        if 0 <= j < len(xs):
            a, c = sorted((xs[j], b))
            if c / a - 1 <= min_gap:
                continue
            m = stable_length(head_dim, rope_theta, int(round(math.sqrt(a * c))), a + 1, min(c - 1, target_length - 1))
            if a < m < c and m not in evaluated:
                out.append(m)
    return out
