"""PoSE's skipped position ids (convert/evaluate/positions.py): the sampling rule and the distances it reaches."""

import numpy as np
import pytest

from convert.evaluate.positions import (
    chunk_spans, coverage, distance_intervals, draw_layout, first_scored, reachable, scoring_positions,
    skipped_positions, window_rng)

ORIGINAL, TARGET, WINDOW = 1024, 4096, 256


def _brute_distances(pos: np.ndarray) -> set[int]:
    return {int(pos[j] - pos[i]) for j in range(len(pos)) for i in range(j + 1)}


@pytest.mark.parametrize("chunks", [2, 3, 5])
def test_every_chunk_is_contiguous_increasing_below_the_target_and_starts_at_0(chunks):
    for seed in range(200):
        rng = window_rng(seed, 0, 0)
        starts, skips = draw_layout(WINDOW, chunks, TARGET, rng)
        assert starts[0] == 0 and starts[-1] == WINDOW and len(starts) == chunks + 1
        assert (np.diff(starts) >= 1).all()  # every chunk holds a token
        assert skips[0] == 0 and (np.diff(skips) >= 0).all() and skips[-1] <= TARGET - WINDOW
        pos = skipped_positions(WINDOW, chunks, TARGET, window_rng(seed, 0, 0))
        assert pos.dtype == np.int64 and pos.shape == (WINDOW,)
        assert pos[0] == 0 and pos[-1] < TARGET and (np.diff(pos) >= 1).all()
        for i in range(chunks):  # contiguous within each chunk, shifted by its skip
            a, b = starts[i], starts[i + 1]
            assert (pos[a:b] == np.arange(a, b) + skips[i]).all()
        assert len(chunk_spans(pos)) <= chunks  # a zero skip joins two chunks into one run


def test_the_distances_reach_the_target_and_spread():
    maxima = []
    for seed in range(300):
        pos = skipped_positions(WINDOW, 2, TARGET, window_rng(seed, 3, 1))
        maxima.append(coverage(pos, TARGET)["max_distance"])
    maxima = np.array(maxima)
    assert maxima.max() >= 0.9 * TARGET and maxima.max() <= TARGET - 1
    # spread: some windows reach just past the original window, not half the target
    assert ((maxima > ORIGINAL) & (maxima < TARGET // 2)).any()
    assert (maxima < ORIGINAL).any()  # small skips happen (the fit redraws those, scoring_positions)


def test_the_same_seed_gives_the_same_ids_and_another_seed_others():
    a = skipped_positions(WINDOW, 3, TARGET, window_rng(7, 2, 1))
    b = skipped_positions(WINDOW, 3, TARGET, window_rng(7, 2, 1))
    assert np.array_equal(a, b)
    for other in (window_rng(8, 2, 1), window_rng(7, 3, 1), window_rng(7, 2, 2)):
        assert not np.array_equal(a, skipped_positions(WINDOW, 3, TARGET, other))


def test_one_chunk_is_arange_and_bad_layouts_are_refused():
    assert np.array_equal(skipped_positions(WINDOW, 1, TARGET, window_rng(0, 0, 0)), np.arange(WINDOW))
    with pytest.raises(ValueError, match="chunks <= 4"):
        skipped_positions(4, 5, TARGET, window_rng(0, 0, 0))
    with pytest.raises(ValueError, match="window <= 100"):
        skipped_positions(200, 2, 100, window_rng(0, 0, 0))
    # the whole window at the target length: no room to skip, positions 0 .. W - 1
    assert np.array_equal(skipped_positions(64, 3, 64, window_rng(0, 0, 0)), np.arange(64))


def test_coverage_matches_every_pair_of_positions():
    for seed in range(20):
        pos = skipped_positions(48, 1 + seed % 4, 400, window_rng(seed, 0, 0))
        want = _brute_distances(pos)
        got = {d for lo, hi in distance_intervals(pos) for d in range(lo, hi + 1)}
        assert got == want
        cov = coverage(pos, 400)
        assert cov["max_distance"] == max(want) == pos[-1] and cov["distances"] == len(want)
        assert cov["fraction"] == pytest.approx(len(want) / 400)
        mask = reachable(pos, 400)
        assert set(np.flatnonzero(mask).tolist()) == want


def test_a_constructed_window_s_distances_and_scored_suffix():
    pos = np.concatenate([np.arange(0, 10), np.arange(100, 122)])  # chunks [0, 9] and [100, 121]
    assert chunk_spans(pos) == [(0, 9), (100, 121)]
    assert distance_intervals(pos) == [(0, 21), (91, 121)]
    assert first_scored(pos, 64) == 10 and first_scored(pos, 110) == 20 and first_scored(pos, 500) == 32
    assert first_scored(np.arange(32), 0) == 0


def test_scoring_positions_redraws_until_the_last_position_reaches_score_from():
    draws = [scoring_positions(WINDOW, 2, TARGET, ORIGINAL, window_rng(s, 0, 0)) for s in range(100)]
    assert all(p[-1] >= ORIGINAL for p in draws)
    # the first draw is kept when it already scores: the plain rule's ids
    for s in range(100):
        plain = skipped_positions(WINDOW, 2, TARGET, window_rng(s, 0, 0))
        if plain[-1] >= ORIGINAL:
            assert np.array_equal(plain, draws[s])
    # deterministic
    assert np.array_equal(draws[5], scoring_positions(WINDOW, 2, TARGET, ORIGINAL, window_rng(5, 0, 0)))
    # unreachable: the last draw comes back as it is, scoring nothing
    p = scoring_positions(WINDOW, 2, TARGET, TARGET, window_rng(0, 0, 0), tries=5)
    assert p[-1] < TARGET and first_scored(p, TARGET) == WINDOW


def test_span_weights_stand_distant_chunks_for_the_positions_they_skip():
    from convert.evaluate.positions import span_log_weights

    # chunk 0: positions 0..3 (4 tokens standing for 0..99: 25 positions each); chunk 1: 100..101 (the last: weight 1)
    pos = np.array([0, 1, 2, 3, 100, 101])
    b = span_log_weights(pos)
    assert b.shape == (6, 6)
    assert np.all(np.isneginf(b[np.triu_indices(6, 1)]))  # causal
    assert np.allclose(b[4:, :4], np.log(25.0))  # a query past the skip: the distant chunk's keys weigh 25 each
    assert np.all(b[:4, :4][np.tril_indices(4)] == 0) and b[5, 4] == 0 and b[4, 4] == 0  # its own chunk: weight 1
    # the weighted softmax is the softmax over the repeated keys: 4 keys x 25 copies + the query's own 2 keys
    logits = np.array([0.3, -0.2, 0.1, 0.5, 0.0, 0.7])
    w = np.exp(logits + b[5])
    repeated = np.concatenate([np.repeat(np.exp(logits[:4]), 25), np.exp(logits[4:])])
    assert np.isclose(w[:4].sum() / w.sum(), repeated[:100].sum() / repeated.sum())
    assert np.all(span_log_weights(np.arange(5))[np.tril_indices(5)] == 0)  # contiguous: plain causal attention
