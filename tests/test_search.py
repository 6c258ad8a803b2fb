"""LongRoPE's evolutionary search (dprope.search): constraints, duplicates, determinism, resumption, convergence,
LongRoPE2 mode, the initial population and the registry method.  Synthetic fitnesses only (no model)."""

import json
import math

import numpy as np
import pytest
import torch

import dprope
from dprope import DPRoPEError
from dprope.freqs import RopeContext
from dprope.methods import available_methods, get_method, run_method
from dprope.search import (SearchConfig, critical_pair, crossover, initial_population, is_valid,
                           longrope_yarn_shape, make_space, mutate, new_mutant, search)

CTX = RopeContext(dprope.base_inv_freq(1e4, 32), 1e4, 4096, 16384)  # 16 pairs, s = 4
SMALL = dict(population=16, parents=8, mutations=6, crossovers=6, iterations=8, seed=3)
# a monotone target on the grid, inside [1, 1 + s]
TARGET = torch.tensor([1, 1, 1, 1, 1.2, 1.5, 1.8, 2.2, 2.6, 3.0, 3.4, 3.8, 4.1, 4.4, 4.7, 5.0], dtype=torch.float64)


class Recorder:
    """A fitness: squared distance to TARGET (+ the temperature's distance to 1.1); records every call."""

    def __init__(self, fail_after: int | None = None):
        self.calls: list[tuple[tuple[float, ...], float]] = []
        self.fail_after = fail_after

    def __call__(self, factors: torch.Tensor, temperature: float) -> float:
        if self.fail_after is not None and len(self.calls) >= self.fail_after:
            raise KeyboardInterrupt
        assert factors.dtype == torch.float32 and factors.shape == (CTX.n_pairs,)
        self.calls.append((tuple(factors.tolist()), float(temperature)))
        return float(((factors.double() - TARGET) ** 2).sum()) + (temperature - 1.1) ** 2


def _same(a, b):
    assert np.array_equal(a.factors, b.factors) and a.fitness == b.fitness and a.temperature == b.temperature
    assert a.trace == b.trace and a.evals == b.evals


def test_every_evaluated_individual_is_valid_and_none_twice():
    for longrope2 in (False, True):
        fit = Recorder()
        r = search(CTX, fit, SearchConfig(**SMALL, longrope2=longrope2, search_temperature=True))
        cd = critical_pair(CTX) if longrope2 else None
        assert len(fit.calls) == r.evals == len(set(fit.calls))  # never the same individual twice
        for f, t in fit.calls:
            assert is_valid(torch.tensor(f), CTX.scale, 0.01, critical=cd), f
            assert 1.0 <= t <= 1.5 and abs(t * 100 - round(t * 100)) < 1e-6
        assert r.trace[0]["iteration"] == 0 and len(r.trace) == SMALL["iterations"] + 1
        assert [e["evals"] for e in r.trace] == sorted(e["evals"] for e in r.trace)
        assert all(e["best"] <= e["median"] for e in r.trace)
        assert [e["best"] for e in r.trace] == sorted((e["best"] for e in r.trace), reverse=True)  # elitist


def test_operators_keep_monotone_grid_and_bounds():
    space = make_space(CTX, SearchConfig())
    rng = np.random.default_rng(0)
    key = tuple(int(round(float(x) * 100)) for x in TARGET)
    for _ in range(200):
        child = mutate(key, space, rng, 0.3)
        assert space.valid(child) and is_valid(space.expand(child)[0], CTX.scale)
    other = tuple(sorted(int(x) for x in rng.integers(space.lo, space.hi + 1, size=16)))
    kids = [crossover(key, other, space, rng, 0.15, {key, other}) for _ in range(200)]
    made = [k for k in kids if k is not None]  # None: no new monotone mix in 20 passes (then a mutation)
    assert len(made) > 50 and all(k not in (key, other) and space.valid(k) for k in made)
    assert all(all(c in (x, y) for c, x, y in zip(k, key, other)) for k in made)
    assert crossover(key, key, space, rng, 0.15, set()) is None  # equal parents: the caller mutates instead
    assert new_mutant(key, space, rng, SearchConfig(), {key}) not in (None, key)
    assert not is_valid(torch.tensor([1.0, 1.2, 1.1]), 4)  # not monotone
    assert not is_valid(torch.tensor([1.0, 1.005]), 4)  # off the grid
    assert not is_valid(torch.tensor([1.0, 5.01]), 4) and not is_valid(torch.tensor([0.99, 2.0]), 4)


def test_deterministic_under_a_seed():
    a = search(CTX, Recorder(), SearchConfig(**SMALL))
    b = search(CTX, Recorder(), SearchConfig(**SMALL))
    _same(a, b)
    c = search(CTX, Recorder(), SearchConfig(**{**SMALL, "seed": 4}))
    assert c.trace != a.trace


@pytest.mark.parametrize("stop_at,save_every", [(5, 1), (40, 1), (40, 7)])  # initial population; later iteration
def test_resume_after_interrupt_equals_an_uninterrupted_run(tmp_path, stop_at, save_every):
    cfg = SearchConfig(**SMALL, search_temperature=True, save_every=save_every)
    whole = search(CTX, Recorder(), cfg)
    state = tmp_path / "search.json"
    first = Recorder(fail_after=stop_at)
    with pytest.raises(KeyboardInterrupt):
        search(CTX, first, cfg, state_path=state)
    saved = json.loads(state.read_text())
    assert saved["evals"] == stop_at and len(saved["cache"]) == stop_at and "rng" in saved  # saved on the way out
    assert list(tmp_path.iterdir()) == [state]  # no temporary file left
    assert all(set(e) >= {"iteration", "best", "median", "evals"} for e in saved["trace"])
    assert dprope.SearchConfig is SearchConfig
    second = Recorder()
    resumed = search(CTX, second, cfg, state_path=state)
    _same(resumed, whole)
    assert not set(first.calls) & set(second.calls)  # nothing evaluated again
    # a finished state resumes to the same result without evaluating
    third = Recorder()
    _same(search(CTX, third, cfg, state_path=state), whole)
    assert third.calls == []
    with pytest.raises(DPRoPEError, match="another search"):
        search(CTX, Recorder(), SearchConfig(**{**SMALL, "seed": 9}), state_path=state)


def test_evaluation_budget_stops_and_a_larger_budget_continues(tmp_path):
    cfg = SearchConfig(**SMALL)
    whole = search(CTX, Recorder(), cfg)
    state = tmp_path / "s.json"
    part = search(CTX, Recorder(), SearchConfig(**SMALL, budget_evals=30), state_path=state)
    assert part.stopped == "budget_evals" and part.evals == 30
    done = search(CTX, Recorder(), cfg, state_path=state)
    _same(done, whole)
    json.dumps(done.to_dict())


def test_time_budget():
    with pytest.raises(DPRoPEError, match="budget"):
        search(CTX, Recorder(), SearchConfig(**SMALL, budget_seconds=0))
    import time

    slow = lambda f, t: time.sleep(0.03) or 1.0  # noqa: E731
    r = search(CTX, slow, SearchConfig(**SMALL, budget_seconds=0.3, init_methods=("yarn",)))
    assert r.stopped == "budget_seconds" and 1 <= r.evals < 16 and r.trace == []


def test_finds_a_known_optimum():
    """LongRoPE's defaults (64 + 40 x 32 evaluations) get within a few grid steps of the optimum (its uniform
    resampling between neighbours converges slowly at the end: fitness ~0.01-0.02 over seeds 0..7)."""
    progress = []
    r = search(CTX, Recorder(), SearchConfig(seed=0), progress=progress.append)
    assert len(progress) == 41 and r.evals == 64 + 40 * 32 and r.stopped == "done"
    assert r.fitness < 0.03 and r.fitness < r.trace[0]["best"] / 40, r.factors
    assert (r.factors.double() - TARGET).abs().max() < 0.1 + 1e-6


def test_longrope2_derives_the_pairs_below_the_critical_pair():
    cd = critical_pair(CTX)
    b, d, L = 1e4, 32, 4096
    assert cd == math.ceil(math.log(L / (2 * math.pi), b) * d / 2) - 1 and 0 < cd < CTX.n_pairs
    fit = Recorder()
    r = search(CTX, fit, SearchConfig(**SMALL, longrope2=True))
    assert r.critical_pair == cd
    for f, _ in fit.calls + [(tuple(r.factors.tolist()), 0)]:
        f = torch.tensor(f, dtype=torch.float64)
        want = f[cd] ** (torch.arange(cd, dtype=torch.float64) / cd)
        assert np.allclose(f[:cd], want, rtol=1e-6)
    # without rope_theta, the critical pair comes from the wavelengths
    assert critical_pair(RopeContext(CTX.inv_freq, None, 4096, 16384)) == cd


def test_initial_population_holds_yarn_shape_and_the_dprope_default():
    cfg = SearchConfig(**SMALL)
    space = make_space(CTX, cfg)
    pop = initial_population(CTX, cfg, np.random.default_rng(0), space)
    assert len(pop) == cfg.population == len(set(pop))
    # LongRoPE's YaRN shape: lambda = s (1 - m) + m with YaRN's ramp m
    m = dprope.candidates.yarn_ramp(CTX).astype(np.float64)
    assert np.allclose(longrope_yarn_shape(CTX), 4 * (1 - m) + m, atol=1e-6)
    grid = lambda f: tuple(np.maximum.accumulate(np.clip(np.rint(np.asarray(f, dtype=np.float64) * 100), 100, 500))
                           .astype(int).tolist())  # noqa: E731
    assert pop[0] == grid(longrope_yarn_shape(CTX).tolist())
    assert pop[1] == grid(run_method("dprope", CTX).factors.tolist())
    assert all(space.valid(k) for k in pop)


def test_registry_method_needs_a_fitness_and_works_with_one(tmp_path):
    m = get_method("longrope-search")
    assert m.family == "search" and not m.standalone and m.defaults["fitness"] is None
    assert m.defaults["population"] == 64 and m.defaults["iterations"] == 40 and m.defaults["parents"] == 32
    assert "longrope-search" in available_methods() and "longrope-search" not in available_methods(standalone=True)
    with pytest.raises(DPRoPEError, match="fitness"):
        run_method("longrope-search", CTX)
    fit = Recorder()
    r = run_method("longrope-search", CTX, fitness=fit, state_path=str(tmp_path / "st.json"), **SMALL)
    direct = search(CTX, Recorder(), SearchConfig(**SMALL))
    assert np.array_equal(r.factors, direct.factors) and r.method == "longrope-search"
    assert r.temperature == pytest.approx(math.sqrt(1 + math.log(4) / math.log(4096)))
    assert np.allclose(r.inv_freq, r.base_inv_freq / r.factors)
    assert r.params["search"]["trace"] == direct.trace and "longrope-search" in r.per_pair
    json.dumps(r.to_dict())  # the fitness callable is named, not stored
