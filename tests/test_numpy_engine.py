"""The engine (dprope/) computes with NumPy so that GGUF-only commands never import torch; these tests pin its
numbers to torch's, operation for operation, where a real RoPE (transformers) computes them with torch."""

import math

import numpy as np
import pytest
import torch

import dprope
from dprope.freqs import RopeContext, as_array

THETAS = [10000.0, 15000.0, 40000.0, 100000.0, 250000.0, 500000.0, 1e6, 5e6, 8e6, 1e7]
HEAD_DIMS = [8, 16, 32, 48, 64, 80, 96, 112, 128, 160, 192, 256]


def _torch_inv_freq(theta: float, d: int) -> np.ndarray:
    # transformers' modeling_rope_utils.py _compute_default_rope_parameters
    return (1.0 / (theta ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))).numpy()


def _torch_histogram(inv_freq: torch.Tensor, length: int, bins: int) -> np.ndarray:
    """The torch form the engine used before (per-position float32 angles, remainder, bin), kept as the oracle."""
    n = inv_freq.numel()
    angles = inv_freq.float().unsqueeze(1) * torch.arange(length, dtype=torch.int64)
    angles = torch.remainder(angles, torch.pi * 2).mul_(bins / (torch.pi * 2))
    idx = angles.to(torch.int64).clamp_(max=bins - 1) + (torch.arange(n) * bins).unsqueeze(1)
    return torch.bincount(idx.flatten(), minlength=n * bins).view(n, bins).numpy()


def _ulps(a: np.ndarray, b: np.ndarray) -> int:
    return int(np.abs(a.view(np.int32).astype(np.int64) - b.view(np.int32).astype(np.int64)).max())


def test_base_inv_freq_is_torchs_within_two_ulp():
    """torch's vectorised float32 pow (SLEEF, 1-ulp accuracy) and NumPy's differ by an ulp in a few entries; the
    reciprocal can add one.  Which entries differ depends on the vector code each library dispatches to on the CPU
    at hand (bit-equal at the golden tests' settings on AVX2 machines, 2 ulp apart on an AVX-512 one), so what must
    hold everywhere is the bound; the golden tests (tests/test_engine.py: LLaMA2's reference pair sets) pin that the
    choices built on these frequencies are the reference's."""
    for theta in THETAS:
        for d in HEAD_DIMS:
            got = dprope.base_inv_freq(theta, d)
            assert got.dtype == np.float32
            assert _ulps(got, _torch_inv_freq(theta, d)) <= 2, (theta, d)
    for theta, d in ((10000.0, 128), (100000.0, 64)):  # the golden tests' settings and SmolLM2's
        assert _ulps(dprope.base_inv_freq(theta, d), _torch_inv_freq(theta, d)) <= 2


@pytest.mark.parametrize("theta,d,length", [(10000.0, 128, 4096), (100000.0, 64, 8192), (1e6, 256, 3000),
                                             (500000.0, 128, 20011)])
def test_angle_histogram_is_the_torch_computation(theta, d, length):
    inv = torch.from_numpy(_torch_inv_freq(theta, d))
    want = _torch_histogram(inv, length, 360)
    got = dprope.angle_histogram(inv.numpy(), length, 360, chunk_elems=1 << 12)  # many chunks
    assert np.array_equal(got, want)
    # scaled frequencies (a candidate's), not just the plain ones
    scaled = inv / torch.linspace(1, 4, d // 2)
    assert np.array_equal(dprope.angle_histogram(scaled.numpy(), 2 * length, 90), _torch_histogram(scaled, 2 * length, 90))


def test_arrays_and_tensors_are_read_alike():
    t = torch.linspace(0.1, 1.0, 8)
    assert np.array_equal(as_array(t), t.numpy())
    ctx = RopeContext(t, 10000.0, 4096, 8192)  # a torch tensor given: held as float32 NumPy
    assert isinstance(ctx.inv_freq, np.ndarray) and ctx.inv_freq.dtype == np.float32 and ctx.n_pairs == 8
    r = dprope.compute_factors(t, original_length=4096, target_length=8192)
    r2 = dprope.compute_factors(t.numpy(), original_length=4096, target_length=8192)
    assert np.array_equal(r.factors, r2.factors) and r.chosen == r2.chosen


def test_formula_factors_match_their_torch_definitions():
    from dprope.candidates import llama3_factors, yarn_factors

    theta, d, L, target = 500000.0, 128, 8192, 65536
    ctx = RopeContext(dprope.base_inv_freq(theta, d), theta, L, target)
    s = target / L
    # YaRN's ramp as transformers computes it (float32 arange, clamp), then 1 / (gamma + (1 - gamma) / s)
    low = max(math.floor(d * math.log(L / (32 * 2 * math.pi)) / (2 * math.log(theta))), 0)
    high = min(math.ceil(d * math.log(L / (1 * 2 * math.pi)) / (2 * math.log(theta))), d - 1)
    ramp = ((torch.arange(d // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    gamma = 1 - ramp
    assert np.array_equal(yarn_factors(ctx), (1.0 / (gamma + (1 - gamma) / s)).numpy())
    wavelen = 2 * math.pi / torch.from_numpy(ctx.inv_freq).double()
    k = (L / wavelen - 1.0) / (4.0 - 1.0)
    smooth = 1.0 / ((1 - k) / s + k)
    f = torch.where(wavelen > L, torch.full_like(wavelen, s), torch.ones_like(wavelen))
    want = torch.where((wavelen <= L) & (wavelen >= L / 4), smooth, f).float().numpy()
    assert np.array_equal(llama3_factors(ctx), want)
