"""Sample counts and 95% intervals (convert/evaluate/stats.py) on cases known by hand."""

import math

import numpy as np
import pytest

from convert.evaluate import stats


def test_wilson_matches_hand_computed_bounds():
    # 8 of 10: centre (0.8 + z^2/20) / (1 + z^2/10) = 0.7167, half-width 0.2266 (Wilson 1927, eq. for p +- ...)
    lo, hi = stats.wilson(8, 10)
    assert (round(lo, 4), round(hi, 4)) == (0.4902, 0.9433)
    # 0 of 20: [0, z^2 / (n + z^2)]; 20 of 20: [n / (n + z^2), 1] (the normal interval would be [0, 0] and [1, 1])
    z2 = stats.Z95 ** 2
    assert stats.wilson(0, 20) == (0.0, pytest.approx(z2 / (20 + z2)))
    assert stats.wilson(20, 20) == (pytest.approx(20 / (20 + z2)), 1.0)
    assert round(stats.wilson(0, 20)[1], 4) == 0.1611 and round(stats.wilson(20, 20)[0], 4) == 0.8389
    # 90% at n = 500 and n = 50: about +-2.6 and +-8.3 points
    lo, hi = stats.wilson(450, 500)
    assert (hi - lo) / 2 == pytest.approx(0.026, abs=0.001)
    lo, hi = stats.wilson(45, 50)
    assert (hi - lo) / 2 == pytest.approx(0.083, abs=0.003)
    with pytest.raises(ValueError):
        stats.wilson(0, 0)


def test_accuracy_is_wilson_for_binary_scores_and_a_bootstrap_otherwise():
    s = stats.accuracy([1, 1, 1, 1, 1, 1, 1, 1, 0, 0])
    assert s == {"value": 0.8, "n": 10, "lo": pytest.approx(0.4902, abs=1e-4), "hi": pytest.approx(0.9433, abs=1e-4),
                 "method": "Wilson score", "unit": "prompts"}
    part = stats.accuracy([0.5, 1.0, 0.25, 1.0, 0.75])
    assert part["method"].startswith("percentile bootstrap") and part["lo"] <= part["value"] <= part["hi"]
    assert stats.accuracy([])["value"] is None and stats.accuracy([0.5])["lo"] is None


def test_perplexity_bootstrap_is_seeded_pinned_and_contains_the_estimate():
    nll = [20.0, 26.0, 16.0, 22.0, 30.0, 18.0, 24.0, 21.0]  # per document, 10 tokens each
    toks = [10] * 8
    s = stats.perplexity(nll, toks)
    assert s["value"] == pytest.approx(math.exp(177 / 80))
    assert s["n"] == 8 and s["unit"] == "documents" and "2000 resamples" in s["method"]
    assert s["lo"] < s["value"] < s["hi"]
    assert (round(s["lo"], 4), round(s["hi"], 4)) == (7.0287, 12.1825)  # pinned: seed 0, 2000 resamples
    assert stats.perplexity(nll, toks) == s  # reproducible
    assert stats.perplexity(nll, toks, seed=1)["lo"] != s["lo"]
    one = stats.perplexity([20.0], [10])
    assert one["value"] == pytest.approx(math.exp(2)) and one["lo"] is None  # one unit: no interval


def test_block_units_of_one_window():
    # 64 positions in blocks of 4 (the stored sums), the last block short: 62 tokens
    ll = [-4.0] * 15 + [-2.0]
    nll, toks, size = stats.block_units(ll, 4, 0, 64, 62)
    assert size == 4 and len(nll) == 16 and sum(toks) == 62 and toks[-1] == 2  # 62 // 4 // 16 = 0: blocks of 4
    nll, toks, size = stats.block_units([-1.0] * 512, 4, 1024, 2048, 2048)  # 1024 positions: 16 blocks of 64
    assert size == 64 and len(nll) == 16 and toks == [64] * 16 and nll == [16.0] * 16
    nll, toks, size = stats.block_units([-1.0] * 256, 128, 0, 32768, 32768)  # capped at MAX_BLOCK tokens
    assert size == stats.MAX_BLOCK and len(nll) == 32
    assert stats.block_units(ll, 4, 6, 64, 62) is None  # a start off the block grid
    assert stats.block_units(ll, 4, 0, 30, 62) is None  # a stop inside a block that goes on


def test_paired_differences_of_identical_scores_are_exactly_zero():
    a = [1, 0, 1, 1, 0, 1, 1, 1]
    s = stats.paired_accuracy(a, a)
    assert (s["value"], s["lo"], s["hi"], s["n"]) == (0.0, 0.0, 0.0, 8)
    r = stats.paired_perplexity_ratio([20.0, 26.0, 16.0], [10, 10, 10], [20.0, 26.0, 16.0], [10, 10, 10])
    assert (r["value"], r["lo"], r["hi"]) == (1.0, 1.0, 1.0)
    # one model better on every document by the same factor: the ratio's interval is that factor
    r = stats.paired_perplexity_ratio([20.0, 26.0, 16.0], [10] * 3, [19.0, 25.0, 15.0], [10] * 3)
    assert r["value"] == pytest.approx(math.exp(-0.1)) and r["lo"] == pytest.approx(r["hi"])
    # a real difference: the paired interval excludes 0 where the two unpaired intervals overlap
    rng = np.random.default_rng(3)
    base = (rng.random(200) < 0.5).astype(float)
    ext = np.maximum(base, rng.random(200) < 0.2)
    d = stats.paired_accuracy(base, ext)
    b, e = stats.accuracy(base), stats.accuracy(ext)
    assert d["lo"] > 0 and d["value"] == pytest.approx(ext.mean() - base.mean()) and b["hi"] > e["lo"]
    assert stats.paired_accuracy([1, 0], [1, 0, 1]) is None  # not the same samples


def test_mean_of_means_and_its_paired_form():
    groups = [[1, 1, 0, 1], [0.5, 0.25, 1.0]]
    s = stats.mean_of_means(groups)
    assert s["value"] == pytest.approx((0.75 + 0.5833333) / 2) and s["n"] == 7 and s["lo"] < s["value"] < s["hi"]
    p = stats.paired_means(groups, groups)
    assert (p["value"], p["lo"], p["hi"]) == (0.0, 0.0, 0.0)
    assert stats.paired_means([[1, 1]], [[1, 1]], factor=0.5)["lo"] == pytest.approx(0.5)
