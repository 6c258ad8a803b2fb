"""The YaRN fit's error, taken run by run of equal correction dims, against the direct formula on every candidate."""

import math

import numpy as np
import pytest

from dprope.yarn_fit import _first, _log_errors, _ramp_bounds, fit_yarn, yarn_factors


def _direct(lw, fs, lo, hi):
    """mean_i (ln lambda_i - lw_i)^2 with lambda from YaRN's formula for every (candidate, pair)."""
    i = np.arange(lw.size, dtype=np.float64)
    ramp = np.clip((i[None] - lo[:, None]) / np.maximum(hi - lo, 0.001)[:, None], 0, 1)
    m = 1 - ramp
    lam = 1.0 / ((1 - m) / fs[:, None] + m)
    return ((np.log(lam) - lw) ** 2).mean(-1)


@pytest.mark.parametrize("head_dim,theta,original,target", [(32, 1e4, 2048, 8192), (64, 1e5, 8192, 32768),
                                                             (128, 5e5, 8192, 131072), (256, 1e6, 32768, 131072)])
def test_errors_match_the_direct_formula_and_pick_the_same_length(head_dim, theta, original, target):
    rng = np.random.default_rng(head_dim)
    for _ in range(3):
        w = np.exp(np.sort(rng.uniform(0, 1.3 * math.log(target / original), head_dim // 2)))
        lengths = np.arange(max(int(target / (2 * w.max())), 2), target + 1)
        fs = target / lengths.astype(np.float64)
        lo, hi = _ramp_bounds(head_dim, theta, lengths)
        assert len(np.unique(np.stack([lo, hi], 1), axis=0)) > 1  # several runs of correction dims are covered
        got, want = _log_errors(np.log(w), fs, lo, hi), _direct(np.log(w), fs, lo, hi)
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=0)
        assert int(np.argmin(got)) == int(np.argmin(want))


def test_a_yarn_is_recovered_exactly():
    """Factors that are a YaRN's are fitted back to that YaRN (zero error)."""
    want = yarn_factors(64, 1e5, 4.0, 8192)
    fit = fit_yarn(want, 64, 1e5, 8192, 32768)
    assert (fit.original_length, fit.factor) == (8192, 4.0)
    assert fit.rms_log_error < 1e-12


def test_first_is_a_stable_argsort_prefix():
    rng = np.random.default_rng(0)
    for n in (5, 64, 1000, 20000):
        for v in (rng.normal(size=n), np.round(rng.normal(size=n), 1)):  # with many ties
            assert np.array_equal(_first(v, 64), np.argsort(v, kind="stable")[:64])
