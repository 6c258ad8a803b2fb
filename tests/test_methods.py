"""The method registry: every method's factors and temperature, the DPRoPE variants against the paper, and the
aliasing-free coverage density."""

import math

import numpy as np
import pytest
import torch

import dprope
from dprope import DPRoPEError, compute_factors
from dprope.freqs import RopeContext
from dprope.histogram import coverage_distribution
from dprope.methods import (DEFAULT_METHOD, available_methods, get_method, register_method, run_method,
                            temperature, unregister_method)

GOLDEN_8K = {*range(2, 7), *range(8, 11), *range(15, 20), 28, *range(30, 45), *range(46, 64)}
LLAMA2 = RopeContext(dprope.base_inv_freq(10000, 128), 10000.0, 4096, 8192)
SMOL = RopeContext(dprope.base_inv_freq(1e5, 64), 1e5, 8192, 16384)


def test_every_method_gives_valid_factors_and_temperature():
    assert DEFAULT_METHOD in available_methods()
    for name in available_methods(standalone=True):  # the search needs a fitness (tests/test_search.py)
        for ctx in (LLAMA2, SMOL, RopeContext(dprope.base_inv_freq(1e5, 64), 1e5, 8192, 32768)):
            r = run_method(name, ctx)
            assert r.method == name and r.params["method"] == name
            assert r.factors.shape == (ctx.n_pairs,) and r.factors.dtype == np.float32
            assert bool((r.factors >= 1 - 1e-6).all()) and bool((r.factors <= ctx.scale + 1e-5).all()), name
            assert np.allclose(r.inv_freq, r.base_inv_freq / r.factors)
            assert math.isfinite(r.temperature) and r.temperature >= 1.0
            # serialisable, and read back identically
            back = dprope.DPRoPEResult.from_dict(r.to_dict())
            assert np.array_equal(back.factors, r.factors) and back.temperature == r.temperature
            assert back.method == name


def test_dprope_paper_is_the_paper_exactly():
    r = run_method("dprope-paper", LLAMA2)
    assert set(r.pairs_for("interpolation")) == GOLDEN_8K
    ref = compute_factors(rope_theta=10000, head_dim=128, original_length=4096, target_length=8192)
    assert np.array_equal(r.factors, ref.factors) and r.temperature == 1.0


def test_formula_methods_equal_their_candidates_and_yarn_carries_its_temperature():
    for method, cand in (("pi", "interpolation"), ("ntk", "ntk"), ("yarn", "yarn"), ("llama3", "llama3")):
        r = run_method(method, SMOL)
        assert np.array_equal(r.factors, dprope.get_candidate(cand).factors(SMOL))
    assert run_method("yarn", SMOL).temperature == pytest.approx(0.1 * math.log(2) + 1)
    assert run_method("pi", SMOL).temperature == 1.0


def test_temperatures():
    assert temperature("none", 4, 8192) == 1.0
    assert temperature("yarn", 4, 8192) == pytest.approx(0.1 * math.log(4) + 1)
    assert temperature("longrope", 4, 8192) == pytest.approx(math.sqrt(1 + math.log(4) / math.log(8192)))
    assert temperature(1.2, 4, 8192) == 1.2
    for bad in ("hot", -1, 0, float("nan")):
        with pytest.raises(DPRoPEError):
            temperature(bad, 4, 8192)
    r = run_method("dprope-paper", SMOL, temperature="longrope")
    assert r.temperature == pytest.approx(math.sqrt(1 + math.log(2) / math.log(8192)))


def test_guard_keeps_fast_pairs_extrapolated():
    paper = run_method("dprope-paper", SMOL)
    guarded = run_method("dprope-guard", SMOL)
    turns = 8192 * SMOL.inv_freq.astype(np.float64) / (2 * math.pi)
    fast = turns >= 32
    assert bool((guarded.factors[fast] == 1).all())
    assert bool((paper.factors[fast] > 1).any())  # the paper interpolates some of them (aliasing)
    assert np.array_equal(guarded.factors[~fast], paper.factors[~fast])
    assert guarded.params["guarded_pairs"] == np.flatnonzero(fast).tolist()


def test_coverage_density_is_a_distribution_and_matches_dense_sampling():
    inv = dprope.base_inv_freq(1e4, 16)
    p = coverage_distribution(inv, 1000, 36)
    assert p.shape == (8, 36)
    assert np.allclose(p.astype(np.float64).sum(1), np.ones(8), atol=1e-5)
    # the continuous coverage is the limit of histograms over ever denser positions: 1000 positions at step 1/64
    dense = dprope.angle_histogram(inv / 64, 64000, 36)
    assert np.allclose(p, dprope.angle_distribution(dense, 64000), atol=2e-4)


def test_coverage_density_removes_the_aliasing_near_ties():
    """On SmolLM2 (b=1e5, d=64, 8k -> 16k) the 360-bin sampled histograms call pair 4 (309 turns in the window)
    disturbed by extrapolation (1.6e-2 nats, a comb of integer positions against the bins); its coverage is even,
    and the coverage divergence of extrapolating it is 1000x smaller."""
    sampled = compute_factors(SMOL.inv_freq, rope_theta=1e5, original_length=8192, target_length=16384)
    cover = compute_factors(SMOL.inv_freq, rope_theta=1e5, original_length=8192, target_length=16384,
                            density="coverage")
    assert sampled.per_pair["extrapolation"][4] > 1e-2
    assert cover.per_pair["extrapolation"][4] < 1e-5
    # fast pairs' extrapolation disturbance falls smoothly with their number of turns under coverage
    assert bool((cover.per_pair["extrapolation"][:8] < 1e-5).all())
    assert not bool((sampled.per_pair["extrapolation"][:8] < 1e-5).any())


def test_tolerance_selection_picks_the_mildest_factor_within_t():
    from dprope.select import Selection, choose

    per_pair = torch.tensor([[0.010, 0.5], [0.009, 0.4], [0.0, 0.0]], dtype=torch.float64)
    factors = torch.tensor([[1.0, 1.0], [1.5, 1.5], [2.0, 2.0]])
    assert choose(per_pair, Selection.parse("tolerance:0.02"), factors).tolist() == [0, 2]
    assert choose(per_pair, Selection.parse("tolerance:0.0095"), factors).tolist() == [1, 2]
    assert choose(per_pair, Selection.parse("tolerance:0"), factors).tolist() == [2, 2]
    with pytest.raises(DPRoPEError):
        Selection.parse("tolerance:-1")
    # with the paper's two candidates tolerance and threshold agree
    a = compute_factors(SMOL.inv_freq, rope_theta=1e5, original_length=8192, target_length=16384,
                        selection="tolerance:0.001")
    b = compute_factors(SMOL.inv_freq, rope_theta=1e5, original_length=8192, target_length=16384,
                        selection="threshold:0.001")
    assert np.array_equal(a.factors, b.factors)


def test_grid_and_ramp_variants_are_monotone_ramps_between_1_and_s():
    for name in ("dprope-grid", "dprope-ramp", DEFAULT_METHOD):
        for T in (16384, 32768):
            ctx = RopeContext(SMOL.inv_freq, 1e5, 8192, T)
            r = run_method(name, ctx)
            assert float(r.factors[0]) == 1.0 and float(r.factors[-1]) == pytest.approx(ctx.scale)
    ramp = run_method("dprope-ramp", SMOL).factors
    assert bool((ramp[1:] >= ramp[:-1]).all())
    assert bool(((ramp > 1) & (ramp < 2)).any())  # a ramp, not a switch


def test_topn_uses_the_papers_share():
    r = run_method("dprope-topn", LLAMA2)
    assert sum(1 for c in r.chosen if c == "interpolation") == 40
    r16 = run_method("dprope-topn", RopeContext(LLAMA2.inv_freq, 1e4, 4096, 16384))
    assert sum(1 for c in r16.chosen if c == "interpolation") == 32
    assert sum(1 for c in run_method("dprope-topn", LLAMA2, n=7).chosen if c == "interpolation") == 7


def test_unknown_method_and_options_are_refused_naming_the_known_ones():
    with pytest.raises(DPRoPEError, match="registered: .*dprope-paper"):
        get_method("nope")
    with pytest.raises(DPRoPEError, match="options: .*temperature"):
        run_method("yarn", SMOL, guard=3)


def test_user_methods_and_candidates_register():
    @dprope.register_candidate("half_pi", "half-way PI")
    def _half(ctx):
        return torch.full((ctx.n_pairs,), (1 + ctx.scale) / 2)

    @register_method("my-method", "PI with a fixed temperature", temperature=1.1)
    def _mine(ctx, temperature):
        r = run_method("pi", ctx)
        r.temperature = temperature
        return r

    try:
        assert run_method("my-method", SMOL).temperature == 1.1
        r = run_method("dprope-paper", SMOL, candidates=["extrapolation", "half_pi"])
        assert set(r.factors.tolist()) <= {1.0, 1.5}
    finally:
        unregister_method("my-method")
        dprope.unregister_candidate("half_pi")


def test_given_factors_from_a_list_a_json_file_or_a_config(tmp_path):
    import json

    vals = [1.0] * 16 + [round(1 + 0.2 * i, 2) for i in range(16)]
    r = run_method("factors", SMOL, long=vals, temperature="longrope")
    assert np.array_equal(r.factors, torch.tensor(vals, dtype=torch.float32))
    assert np.allclose(r.inv_freq, SMOL.inv_freq / r.factors)
    assert r.temperature == pytest.approx(math.sqrt(1 + math.log(2) / math.log(8192)))
    (tmp_path / "f.json").write_text(json.dumps({"long_factor": vals, "temperature": 1.07}))
    (tmp_path / "config.json").write_text(json.dumps({"rope_parameters": {"rope_type": "longrope",
                                                                         "long_factor": vals}}))
    for f in ("f.json", "config.json"):
        assert np.array_equal(run_method("factors", SMOL, long=str(tmp_path / f)).factors, r.factors)
    assert "factors" not in available_methods(standalone=True)  # it needs its factors


def test_given_factors_refuse_bad_input(tmp_path):
    with pytest.raises(DPRoPEError, match="32 rotary pairs"):
        run_method("factors", SMOL, long=[1.0] * 31)
    with pytest.raises(DPRoPEError, match="> 0"):
        run_method("factors", SMOL, long=[1.0] * 31 + [0.0])
    with pytest.raises(DPRoPEError, match="neither a list"):
        run_method("factors", SMOL, long=str(tmp_path / "missing.json"))
    with pytest.raises(DPRoPEError, match="needs long"):
        run_method("factors", SMOL)
