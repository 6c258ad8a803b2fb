"""The DPRoPE engine against the paper's golden results, a reference loop, and each candidate's formula."""

import math

import numpy as np
import pytest
import torch

import dprope
from dprope import DPRoPEError, Selection, angle_histogram, compute_factors
from reference_loop import reference_distribution, reference_dprope

# LLaMA2 (b=1e4, d=128, L=4096, 360 bins, argmin): the pairs the DPRoPE reference code (Wu et al., EMNLP 2024)
# interpolates; test_golden_pairs_are_the_reference_loops_at_full_size recomputes them with tests/reference_loop.py.
GOLDEN_8K = {*range(2, 7), *range(8, 11), *range(15, 20), 28, *range(30, 45), *range(46, 64)}
GOLDEN_16K = {1, 2, 4, 8, 10, 21, 25, 28, *range(30, 64)}


@pytest.mark.parametrize("target,golden", [(8192, GOLDEN_8K), (16384, GOLDEN_16K)])
def test_golden_llama2_pairs(target, golden):
    r = compute_factors(rope_theta=10000, head_dim=128, original_length=4096, target_length=target)
    assert len(golden) == (47 if target == 8192 else 42)
    assert set(r.pairs_for("interpolation")) == golden
    s = target / 4096
    expected = np.array([s if i in golden else 1.0 for i in range(64)], dtype=np.float32)
    assert np.array_equal(r.factors, expected)
    assert r.factors.dtype == np.float32 and r.inv_freq.dtype == np.float32
    assert np.array_equal(r.inv_freq, r.base_inv_freq / expected)
    # the selection disturbs less than either candidate used alone
    assert r.disturbance["selected"] < min(r.disturbance["extrapolation"], r.disturbance["interpolation"])


@pytest.mark.slow
@pytest.mark.parametrize("target,golden", [(8192, GOLDEN_8K), (16384, GOLDEN_16K)])
def test_golden_pairs_are_the_reference_loops_at_full_size(target, golden):
    """The golden sets above, recomputed by the reference double loop at LLaMA2's full size (minutes)."""
    ref_factors, _ = reference_dprope(10000, 128, 4096, target, intervals=360)
    assert {i for i, f in enumerate(ref_factors.tolist()) if f != 1.0} == golden
    r = compute_factors(rope_theta=10000, head_dim=128, original_length=4096, target_length=target)
    assert np.array_equal(r.factors, ref_factors)


@pytest.mark.parametrize("theta,dim,length,bins", [(10000, 8, 300, 360), (500, 16, 517, 37), (1e6, 12, 1000, 2)])
def test_vectorised_histogram_equals_reference_loop(theta, dim, length, bins):
    inv = dprope.base_inv_freq(theta, dim)
    ours = dprope.angle_distribution(angle_histogram(inv, length, bins, chunk_elems=97), length)
    ref = reference_distribution(torch.from_numpy(inv), length, bins)  # the oracle computes with torch
    assert np.array_equal(ours, ref)  # bit-identical, pseudo-count included


def test_histogram_chunking_does_not_change_counts():
    inv = dprope.base_inv_freq(10000, 64)
    a = angle_histogram(inv, 20000, 360, chunk_elems=1 << 22)
    b = angle_histogram(inv, 20000, 360, chunk_elems=1000)
    assert np.array_equal(a, b)
    assert int(a.sum()) == 32 * 20000


@pytest.mark.parametrize("original,target", [(64, 128), (64, 160), (100, 333)])
def test_factors_match_reference_loop_including_non_integer_scale(original, target):
    ref_factors, ref_sims = reference_dprope(10000, 32, original, target, intervals=90)
    r = compute_factors(rope_theta=10000, head_dim=32, original_length=original, target_length=target, bins=90)
    assert np.array_equal(r.factors, ref_factors)
    # the reference divides by the number of bins (reduction='mean'); ours sums: same up to that constant
    ours = np.stack([r.per_pair["extrapolation"], r.per_pair["interpolation"]]).astype(np.float32) / 90
    assert np.allclose(ours, ref_sims, rtol=1e-4, atol=1e-9)


def test_non_integer_scale_factors_are_the_scale():
    r = compute_factors(rope_theta=10000, head_dim=128, original_length=4096, target_length=10000)
    s = 10000 / 4096
    assert r.scale == pytest.approx(s)
    assert set(r.factors.tolist()) <= {1.0, float(np.float32(s))}
    assert 0 < len(r.pairs_for("interpolation")) < 64


def test_ties_go_to_the_first_candidate():
    @dprope.register_candidate("pi_twin", "identical to interpolation")
    def _twin(ctx):
        return torch.full((ctx.n_pairs,), ctx.scale)

    try:
        r = compute_factors(
            rope_theta=10000, head_dim=128, original_length=4096, target_length=8192,
            candidates=["extrapolation", "pi_twin", "interpolation"],
        )
        assert np.array_equal(r.per_pair["pi_twin"], r.per_pair["interpolation"])  # exact tie on every pair
        assert "interpolation" not in r.chosen
        assert set(r.pairs_for("pi_twin")) == GOLDEN_8K
        # order flipped: the other twin wins every tie
        r2 = compute_factors(
            rope_theta=10000, head_dim=128, original_length=4096, target_length=8192,
            candidates=["extrapolation", "interpolation", "pi_twin"],
        )
        assert "pi_twin" not in r2.chosen
    finally:
        dprope.unregister_candidate("pi_twin")


def test_user_registered_candidate_wins_where_it_disturbs_least():
    @dprope.register_candidate("half", "factor 1.5 everywhere")
    def _half(ctx):
        return [1.5] * ctx.n_pairs

    try:
        r = compute_factors(rope_theta=10000, head_dim=32, original_length=256, target_length=512,
                            candidates=["extrapolation", "half", "interpolation"])
        assert set(r.candidates) == {"extrapolation", "half", "interpolation"}
        for i, name in enumerate(r.chosen):
            assert r.per_pair[name][i] == min(r.per_pair[c][i] for c in r.candidates)
    finally:
        dprope.unregister_candidate("half")


def test_bad_candidate_output_is_refused():
    @dprope.register_candidate("short", "wrong length")
    def _short(ctx):
        return [1.0] * (ctx.n_pairs - 1)

    try:
        with pytest.raises(DPRoPEError, match="expected one per rotary pair"):
            compute_factors(rope_theta=10000, head_dim=32, original_length=64, target_length=128,
                            candidates=["extrapolation", "short"])
    finally:
        dprope.unregister_candidate("short")


def test_ntk_factors_formula():
    ctx = dprope.RopeContext(dprope.base_inv_freq(10000, 64), 10000.0, 4096, 16384)
    f = dprope.get_candidate("ntk").factors(ctx)
    expected = torch.tensor([4.0 ** (2 * i / 62) for i in range(32)], dtype=torch.float32)
    assert np.allclose(f, expected, rtol=1e-6)
    # NTK-aware = a larger base: theta_i / f_i == (b * s^(d/(d-2)))^(-2i/d)
    new_base = 10000 * 4.0 ** (64 / 62)
    assert np.allclose(ctx.inv_freq / f, dprope.base_inv_freq(new_base, 64), rtol=1e-5)


def _hf_inv_freq(rope_parameters: dict, head_dim=128, theta=10000.0, max_pos=16384):
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    cfg = LlamaConfig(hidden_size=head_dim * 4, num_attention_heads=4, head_dim=head_dim,
                      max_position_embeddings=max_pos, rope_parameters={"rope_theta": theta, **rope_parameters})
    inv, attn = ROPE_INIT_FUNCTIONS[rope_parameters["rope_type"]](cfg, "cpu")
    return inv, attn


@pytest.mark.parametrize("theta,dim,L,target", [(10000.0, 128, 4096, 16384), (500000.0, 64, 8192, 20000)])
def test_yarn_factors_match_transformers(theta, dim, L, target):
    s = target / L
    hf_inv, _ = _hf_inv_freq({"rope_type": "yarn", "factor": s, "original_max_position_embeddings": L},
                             head_dim=dim, theta=theta, max_pos=target)
    ctx = dprope.RopeContext(dprope.base_inv_freq(theta, dim), theta, L, target)
    f = dprope.get_candidate("yarn").factors(ctx)
    assert np.allclose(ctx.inv_freq / f, hf_inv.float(), rtol=1e-5, atol=0)
    assert f[0] == pytest.approx(1.0) and f[-1] == pytest.approx(s, rel=1e-6)


def test_llama3_factors_match_transformers():
    theta, dim, L, s = 500000.0, 128, 8192, 8.0
    hf_inv, _ = _hf_inv_freq({"rope_type": "llama3", "factor": s, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                              "original_max_position_embeddings": L}, head_dim=dim, theta=theta, max_pos=131072)
    ctx = dprope.RopeContext(dprope.base_inv_freq(theta, dim), theta, L, int(L * s))
    f = dprope.get_candidate("llama3").factors(ctx)
    assert np.allclose(ctx.inv_freq / f, hf_inv.float(), rtol=1e-6, atol=0)
    assert {round(x, 4) for x in f.tolist()} > {1.0, 8.0}  # three bands, medium ones in between


def test_already_scaled_base_is_the_reference_distribution():
    """Llama 3.1: the pre-trained frequencies are llama3-scaled; extending them again starts from those."""
    theta, dim, L = 500000.0, 128, 8192
    plain = dprope.base_inv_freq(theta, dim)
    ctx = dprope.RopeContext(plain, theta, L, L * 16)
    scaled = plain / dprope.llama3_factors(ctx)  # the effective frequencies of a 128k Llama 3.1
    r = compute_factors(scaled, rope_theta=theta, original_length=131072, target_length=262144, bins=360)
    assert np.array_equal(r.base_inv_freq, scaled)
    assert np.array_equal(r.inv_freq, scaled / r.factors)


def test_selection_threshold_and_top_n():
    kw = dict(rope_theta=10000, head_dim=128, original_length=4096, target_length=8192)
    argmin = compute_factors(**kw)
    t0 = compute_factors(**kw, selection="threshold:0")
    assert t0.chosen == argmin.chosen  # t = 0 is argmin for two candidates
    gain = argmin.per_pair["extrapolation"] - argmin.per_pair["interpolation"]
    t = float(torch.from_numpy(gain[list(GOLDEN_8K)]).median())  # torch's median: the lower middle value
    tt = compute_factors(**kw, selection=Selection("threshold", t))
    assert set(tt.pairs_for("interpolation")) == {i for i in range(64) if gain[i] > t}
    top = compute_factors(**kw, selection="top-n:40")  # the paper's n-hat for 4k->8k
    picked = set(top.pairs_for("interpolation"))
    assert len(picked) == 40 and picked < GOLDEN_8K
    assert min(gain[list(picked)]) >= max(gain[[i for i in range(64) if i not in picked]])
    none = compute_factors(**kw, selection="top-n:0")
    assert set(none.chosen) == {"extrapolation"} and np.array_equal(none.factors, np.ones(64))


@pytest.mark.parametrize("spec,msg", [("median", "unknown selection"), ("top-n", "needs a value"),
                                      ("top-n:2.5", "whole number"), ("threshold:x", "not a number")])
def test_bad_selection(spec, msg):
    with pytest.raises(DPRoPEError, match=msg):
        Selection.parse(spec)


@pytest.mark.parametrize(
    "kwargs,msg",
    [
        (dict(rope_theta=1e4, head_dim=128, original_length=4096, target_length=4096), "not longer than"),
        (dict(rope_theta=1e4, head_dim=128, original_length=4096, target_length=2048), "not longer than"),
        (dict(rope_theta=1e4, head_dim=127, original_length=64, target_length=128), "even"),
        (dict(rope_theta=1e4, head_dim=64, original_length=64, target_length=128, bins=1), "bins"),
        (dict(inv_freq=[1.0, float("nan")], original_length=64, target_length=128), "non-finite"),
        (dict(inv_freq=[1.0, float("inf")], original_length=64, target_length=128), "non-finite"),
        (dict(inv_freq=[1.0, -0.5], original_length=64, target_length=128), "> 0"),
        (dict(rope_theta=float("inf"), head_dim=64, original_length=64, target_length=128), "rope_theta"),
        (dict(rope_theta=1e4, head_dim=64, original_length=64, target_length=128, candidates=["bogus"]),
         "unknown candidate"),
    ],
)
def test_clear_errors(kwargs, msg):
    with pytest.raises(DPRoPEError, match=msg):
        compute_factors(**kwargs)


def test_result_dict_has_the_documented_keys():
    r = compute_factors(rope_theta=10000, head_dim=16, original_length=64, target_length=256)
    d = r.to_dict()
    for k in ("factors", "inv_freq", "chosen", "disturbance", "per_pair", "params"):
        assert k in d
    assert set(d["disturbance"]) == {"selected", "extrapolation", "interpolation"}
    assert len(d["per_pair"]["interpolation"]) == 8
    assert d["disturbance"]["selected"] == pytest.approx(
        sum(d["per_pair"][c][i] for i, c in enumerate(d["chosen"])) / 8)
    assert math.isclose(d["params"]["scale"], 4.0)
