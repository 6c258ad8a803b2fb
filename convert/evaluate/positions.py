"""Skipped position ids for short windows (PoSE): relative distances up to the target length from a short input.

PoSE (Zhu et al., ICLR 2024, "PoSE: Efficient Context Window Extension of LLMs via Positional Skip-wise Training",
arXiv 2309.10400; github.com/dwzhu-pku/PoSE ``src/train_pose.py``, ``train_preprocess_function_pose``) trains a
model for a target length Lt on windows of only Lc tokens: the window is cut into N chunks, the first keeps its
positions from 0 and chunk i's positions are shifted by a skip u_i drawn uniformly from u_{i-1} .. Lt - Lc, so every
position stays below Lt while the distance between two tokens of different chunks reaches up to Lt - 1.  (The
repository's revision of 2023-10 sets the first chunk's offset to 0, "more uniform for large relative positions";
its two-chunk code draws the first chunk's end from 1 .. (Lc + 1) // 2, while here the cut points are drawn
uniformly over all ways to cut the window into N non-empty chunks, as the paper's N-chunk rule reads.)

RoPE attention depends on the positions only through the query-key distance, so with frozen weights such a window
shows the rotary factors the relative distances of the target length for the cost of a Lc-token forward.  What it
cannot show is how many tokens are attended at once: a Lc-token window never spreads attention over Lt keys, which is
what an attention temperature compensates (LongRoPE's sqrt(1 + ln s / ln L)).

This module is the data layer only: numpy, no model.  Every draw takes a ``numpy.random.Generator``; the fit seeds
it per window as ``numpy.random.default_rng([seed, step, window_index])`` (:func:`window_rng`).
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

log = logging.getLogger(__name__)


def window_rng(seed: int, step: int, window_index: int) -> np.random.Generator:
    """The generator of one window's position ids: (seed, step, window index within the step)."""
    return np.random.default_rng([int(seed), int(step), int(window_index)])


def check_layout(window: int, chunks: int, target: int) -> None:
    """Refuse a window that cannot be cut into ``chunks`` non-empty chunks below ``target``."""
    for name, v in (("window", window), ("chunks", chunks), ("target", target)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
            raise ValueError(f"{name} must be a whole number >= 1, got {v!r}")
    if chunks > window:
        raise ValueError(f"a window of {window} tokens cannot be cut into {chunks} non-empty chunks; pass "
                         f"chunks <= {window}")
    if window > target:
        raise ValueError(f"a window of {window} tokens does not fit below the target length {target}; pass "
                         f"window <= {target}")


def draw_layout(window: int, chunks: int, target: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(starts, skips): PoSE's random layout of one window.  ``starts`` int64 [chunks + 1]: chunk i is tokens
    starts[i] .. starts[i + 1] - 1 of the window (starts[0] = 0, starts[-1] = window, each chunk >= 1 token, the
    chunks - 1 cut points drawn uniformly without replacement from 1 .. window - 1); ``skips`` int64 [chunks]: u_0 = 0
    and u_i uniform on u_{i-1} .. target - window, both ends included."""
    check_layout(window, chunks, target)
    cuts = np.sort(rng.choice(window - 1, size=chunks - 1, replace=False) + 1) if chunks > 1 else np.zeros(0, int)
    starts = np.concatenate([[0], cuts, [window]]).astype(np.int64)
    skips = np.zeros(chunks, dtype=np.int64)
    room = target - window
    for i in range(1, chunks):
        skips[i] = rng.integers(skips[i - 1], room + 1)  # inclusive of both ends, as random.randint
    return starts, skips


def positions_of(starts: np.ndarray, skips: np.ndarray) -> np.ndarray:
    """The position ids int64 [window] of a layout: token k of chunk i at k + u_i."""
    window = int(starts[-1])
    pos = np.arange(window, dtype=np.int64)
    for i in range(len(skips)):
        pos[starts[i] : starts[i + 1]] += skips[i]
    return pos


def skipped_positions(window: int, chunks: int, target: int, rng: np.random.Generator) -> np.ndarray:
    """PoSE's position ids for a window of ``window`` tokens cut into ``chunks`` chunks, for ``target`` positions:
    int64 [window], contiguous within each chunk, strictly increasing, starting at 0, all < ``target``.  With
    ``chunks`` = 1: arange(window) (no skip)."""
    if chunks == 1:
        check_layout(window, chunks, target)
        return np.arange(window, dtype=np.int64)
    return positions_of(*draw_layout(window, chunks, target, rng))


def scoring_positions(window: int, chunks: int, target: int, score_from: int, rng: np.random.Generator,
                      tries: int = 1000) -> np.ndarray:
    """:func:`skipped_positions` redrawn from the same generator until the last position is >= ``score_from``, so
    the window has a token that reads something further than ``score_from`` away (PoSE's distribution conditioned on
    that; deterministic for a seeded generator).  After ``tries`` draws the last draw is returned as it is (it may
    score nothing; the caller counts it)."""
    pos = skipped_positions(window, chunks, target, rng)
    for _ in range(int(tries) - 1):
        if pos[-1] >= score_from or chunks == 1:
            break
        pos = skipped_positions(window, chunks, target, rng)
    return pos


def first_scored(positions: np.ndarray, score_from: int) -> int:
    """Index of the first position >= ``score_from`` (positions increase, so the scored ones are a suffix);
    len(positions) when none is."""
    return int(np.searchsorted(np.asarray(positions), int(score_from), side="left"))


def chunk_spans(positions: np.ndarray) -> list[tuple[int, int]]:
    """(first, last) position of each contiguous run of ``positions`` (increasing ids)."""
    p = np.asarray(positions, dtype=np.int64)
    if p.size == 0:
        return []
    breaks = np.flatnonzero(np.diff(p) != 1) + 1
    return [(int(a[0]), int(a[-1])) for a in np.split(p, breaks)]


def distance_intervals(positions: np.ndarray) -> list[tuple[int, int]]:
    """The relative distances (query position - key position, >= 0) a causal window with these increasing position
    ids shows, as merged closed intervals [lo, hi]: chunk a's own distances 0 .. len_a - 1 and, for chunks a before
    b, every distance from b's first minus a's last to b's last minus a's first."""
    spans = chunk_spans(positions)
    iv = [(0, last - first) for first, last in spans]
    for a in range(len(spans)):
        for b in range(a + 1, len(spans)):
            iv.append((spans[b][0] - spans[a][1], spans[b][1] - spans[a][0]))
    iv.sort()
    merged: list[list[int]] = []
    for lo, hi in iv:
        if merged and lo <= merged[-1][1] + 1:
            merged[-1][1] = max(merged[-1][1], hi)
        else:
            merged.append([lo, hi])
    return [(lo, hi) for lo, hi in merged]


def coverage(positions: np.ndarray, target: int | None = None) -> dict[str, Any]:
    """What relative distances a window reaches: {"max_distance", "intervals" (merged [lo, hi] of
    :func:`distance_intervals`), "distances" (how many distinct ones), "fraction" (of 0 .. target - 1, when
    ``target`` is given)}."""
    iv = distance_intervals(positions)
    n = sum(hi - lo + 1 for lo, hi in iv)
    out: dict[str, Any] = {"max_distance": iv[-1][1] if iv else 0, "intervals": iv, "distances": n}
    if target is not None:
        out["fraction"] = n / float(target)
    return out


def reachable(positions: np.ndarray, target: int) -> np.ndarray:
    """bool [target]: which relative distances 0 .. target - 1 the window shows."""
    mask = np.zeros(int(target), dtype=bool)
    for lo, hi in distance_intervals(positions):
        mask[lo : min(hi, int(target) - 1) + 1] = True
    return mask


def span_log_weights(positions: np.ndarray) -> np.ndarray:
    """Additive attention bias float64 [L, L] (query, key) that makes a short window's softmax stand for the full
    text its skipped positions span: a key in an earlier chunk than the query is weighted by how many positions its
    chunk stands for per token, (the chunk's span up to the next chunk's first position) / (its tokens), i.e. log of
    that is added to its logit (an importance-sampling estimate of attention over every position up to the query,
    as if each token of the chunk were repeated for the positions skipped after it); keys in the query's own chunk
    keep weight 1; keys after the query are -inf (causal).  So a query past a skip meets the attention mass of the
    tens of thousands of distant keys a full-length window has, which a plain short window lacks (it has a few
    hundred), and a factor set that leaks attention to badly rotated distant keys pays for it as at full length."""
    p = np.asarray(positions, dtype=np.int64)
    L = p.size
    chunk = np.concatenate([[0], np.cumsum(np.diff(p) != 1)]) if L else np.zeros(0, dtype=np.int64)
    n_chunks = int(chunk[-1]) + 1 if L else 0
    starts = np.array([p[chunk == c][0] for c in range(n_chunks)], dtype=np.float64)
    counts = np.bincount(chunk, minlength=n_chunks).astype(np.float64)
    ends = np.append(starts[1:], starts[-1] + counts[-1]) if n_chunks else starts
    logw = np.log(np.maximum((ends - starts) / counts, 1.0))
    bias = np.where(chunk[None, :] < chunk[:, None], logw[chunk][None, :], 0.0)
    bias[np.triu_indices(L, 1)] = -np.inf
    return bias
