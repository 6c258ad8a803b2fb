"""`dprope-fit`: per-pair factors fitted by gradient with the weights frozen.  The pure loop (projection onto
LongRoPE's constraints, projected Adam, resumable state) on synthetic losses; the model's loss and its gradient on
tiny random checkpoints; `dprope extend --method dprope-fit`, resumption after an interruption, two CPU processes
over gloo (the fit and LongRoPE's search) against one; the searched preset recipe."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner

import dprope
from convert.cli import main
from convert.errors import ConvertError
from convert.formats.checkpoint import open_source
from dprope.fit import FitConfig, bound_value, fit, guarded_pairs, isotonic, project, satisfies
from dprope.freqs import RopeContext
from dprope.methods import run_method
from tiny import ORIGINAL

ROOT = Path(__file__).resolve().parent.parent
TARGET = 4 * ORIGINAL
SCALE = TARGET / ORIGINAL
# a fit that lowers the tiny model's loss within a few steps (the random models' loss is rough at larger steps)
FIT = ["--opt", "samples=2", "--opt", "lr=0.01"]
LAUNCH_TIMEOUT_S = 300


def _ctx(n_pairs=8, original=ORIGINAL, target=TARGET, theta=10000.0):
    return RopeContext(dprope.base_inv_freq(theta, 2 * n_pairs), theta, original, target)


# ------------------------------------------------------------------------------------------- the pure parts
def test_isotonic_and_projection_are_the_nearest_feasible_points():
    assert isotonic([1, 3, 2, 4]) == [1, 2.5, 2.5, 4]
    assert isotonic([3, 2, 1]) == [2, 2, 2]
    assert isotonic([0, 1, 2]) == [0, 1, 2]
    lo, hi = 0.0, math.log(1 + SCALE)
    x = [-0.3, 0.5, 0.2, 2.5, 1.0]
    p = project(x, lo, hi, monotone=True)
    assert p == sorted(p) and min(p) >= lo and max(p) <= hi
    # nearest: no feasible point of a fine random cloud is closer
    g = torch.Generator().manual_seed(0)
    dist = sum((a - b) ** 2 for a, b in zip(x, p))
    for _ in range(2000):
        q = sorted(torch.rand(5, generator=g).mul(hi).tolist())
        assert sum((a - b) ** 2 for a, b in zip(x, q)) >= dist - 1e-12
    # fixed leading coordinates stay, and bound the rest from below
    assert project([0.4, 0.1, 0.9], lo, hi, True, fixed=1) == [0.4, 0.4, 0.9]
    assert project([0.4, 0.1, 0.9], lo, hi, False) == [0.4, 0.1, 0.9]


def test_bounds_read_expressions_in_the_scale():
    assert bound_value("1+s", 4) == 5 and bound_value("1.25s", 4) == 5 and bound_value("1.25*s", 8) == 10
    assert bound_value("s", 4) == 4 and bound_value(2, 4) == 2 and bound_value("none", 4) is None
    assert bound_value("1+0.5s", 4) == 3
    with pytest.raises(dprope.DPRoPEError, match="expression in the scale"):
        bound_value("twice", 4)
    with pytest.raises(dprope.DPRoPEError, match="hold nothing"):
        fit(_ctx(), lambda *a: None, FitConfig(low=3, high=2, budget_steps=1))


def _quadratic(target: torch.Tensor, t_target: float = 1.2, calls: list | None = None):
    """A smooth loss with its minimum at log-factors ``target`` (and temperature ``t_target``)."""

    def loss_and_grad(x, t, step):
        if calls is not None:
            calls.append(step)
        d = x - target
        return float((d * d).sum() + (t - t_target) ** 2), 2 * d, 2 * (t - t_target)

    return loss_and_grad


def test_fit_lowers_a_loss_and_keeps_longrope_s_constraints():
    ctx = _ctx()
    # a minimum outside the constraints: decreasing, and past 1 + s at the end
    target = torch.tensor([1.2, 1.0, 0.8, 0.9, 1.4, 1.7, 2.0, 2.2], dtype=torch.float64)
    r = fit(ctx, _quadratic(target), FitConfig(budget_steps=60, lr=0.1, guard=None))
    assert r.loss < r.init["loss"] and r.trace[0]["loss"] == r.init["loss"] and r.init["method"] == "dprope"
    assert satisfies(r.factors, SCALE) and max(r.factors.tolist()) == pytest.approx(1 + SCALE, rel=1e-5)
    assert r.factors.tolist() == sorted(r.factors.tolist()) and min(r.factors.tolist()) >= 1.0
    assert all(e["best"] <= e["loss"] for e in r.trace) and r.steps == 60 and r.stopped == "budget_steps"
    # the constrained optimum: the projection of the target (a convex problem), reached closely
    want = project(target.tolist(), 0.0, math.log(1 + SCALE), True)
    assert torch.allclose(r.factors.double().log(), torch.tensor(want, dtype=torch.float64), atol=0.05)
    assert r.temperature == pytest.approx(run_method("dprope", ctx).temperature)  # fixed: the init's
    # other bounds, no monotonicity, a fitted temperature
    r2 = fit(ctx, _quadratic(target), FitConfig(budget_steps=80, lr=0.1, guard=None, monotone=False, high="1.25s",
                                                fit_temperature=True, temperature_range=(1.0, 1.3)))
    assert max(r2.factors.tolist()) <= 1.25 * SCALE * (1 + 1e-6) and not satisfies(r2.factors, SCALE)
    assert satisfies(r2.factors, SCALE, FitConfig(monotone=False, high="1.25s"))
    assert r2.temperature == pytest.approx(1.2, abs=0.02)


def test_guarded_fast_pairs_keep_the_init_factor():
    ctx = _ctx(n_pairs=32, original=8192, target=32768, theta=100000.0)  # SmolLM2-135M's rotary
    assert guarded_pairs(ctx, 32) == 11 and guarded_pairs(ctx, None) == 0
    init = run_method("dprope", ctx).factors
    r = fit(ctx, _quadratic(torch.full((32,), 0.7, dtype=torch.float64)), FitConfig(budget_steps=5, lr=0.1))
    assert torch.equal(r.factors[:11], torch.from_numpy(init[:11])) and not torch.equal(r.factors[11:], torch.from_numpy(init[11:]))
    assert r.fixed_pairs == 11 and satisfies(r.factors, 4.0)


def test_interrupted_fit_resumes_to_the_uninterrupted_result(tmp_path):
    ctx = _ctx()
    target = torch.linspace(0.1, 1.5, 8, dtype=torch.float64)
    cfg = FitConfig(budget_steps=12, lr=0.05, guard=None)
    whole = fit(ctx, _quadratic(target), cfg, state_path=tmp_path / "whole.json")
    calls = []
    inner = _quadratic(target, calls=calls)

    def dies_at_5(x, t, step):
        if step == 5:
            raise KeyboardInterrupt
        return inner(x, t, step)

    state = tmp_path / "state.json"
    with pytest.raises(KeyboardInterrupt):
        fit(ctx, dies_at_5, cfg, state_path=state)
    assert json.loads(state.read_text())["step"] == 5
    resumed = fit(ctx, inner, cfg, state_path=state)
    assert calls == list(range(12))  # every step evaluated once, none twice
    assert torch.equal(resumed.factors, whole.factors) and resumed.trace == whole.trace
    assert resumed.loss == whole.loss and resumed.steps == 12
    # a larger budget continues; other settings refuse the state
    more = fit(ctx, inner, FitConfig(budget_steps=14, lr=0.05, guard=None), state_path=state)
    assert more.steps == 14 and calls[-2:] == [12, 13]
    with pytest.raises(dprope.DPRoPEError, match="belongs to another fit"):
        fit(ctx, inner, FitConfig(budget_steps=14, lr=0.1, guard=None), state_path=state)


@pytest.mark.parametrize("budget", [None, 11])  # 11: the budget ends inside a generation
def test_a_fitness_scoring_a_generation_at_once_searches_exactly_as_one_at_a_time(budget):
    from dprope.search import search
    from dprope.search_config import SearchConfig

    def fitness(factors, temperature):
        w = torch.arange(1, factors.numel() + 1, dtype=torch.float64)
        return float((w * (factors.double() - 2.1).abs()).sum() * temperature)

    class Batched:
        def __init__(self):
            self.batches = []

        def __call__(self, factors, temperature):
            raise AssertionError("a generation goes to evaluate_many")

        def evaluate_many(self, items):
            self.batches.append(len(items))
            return [fitness(f, t) for f, t in items]

    cfg = SearchConfig(population=6, parents=3, mutations=2, crossovers=2, iterations=3, seed=2, budget_evals=budget)
    one = search(_ctx(), fitness, cfg)
    batched = Batched()
    many = search(_ctx(), batched, cfg)
    assert torch.equal(one.factors, many.factors) and one.trace == many.trace and one.evals == many.evals
    assert batched.batches[0] == 6 and sum(batched.batches) == many.evals and len(batched.batches) <= 4


def test_the_method_refuses_to_run_without_its_loss():
    with pytest.raises(dprope.DPRoPEError, match="dprope-fit needs loss_and_grad.*--method dprope-fit --budget"):
        run_method("dprope-fit", _ctx(), budget_steps=3)
    with pytest.raises(dprope.DPRoPEError, match="needs a budget"):
        run_method("dprope-fit", _ctx(), loss_and_grad=_quadratic(torch.zeros(8)))
    with pytest.raises(dprope.DPRoPEError, match="init must be a method that runs without the model"):
        run_method("dprope-fit", _ctx(), loss_and_grad=_quadratic(torch.zeros(8)), budget_steps=1,
                   init="longrope-search")
    from dprope.methods import available_methods, get_method

    assert get_method("dprope-fit").family == "search" and "dprope-fit" not in available_methods(standalone=True)


# ------------------------------------------------------------------------------------------- the model's loss
def test_the_loss_gradient_matches_finite_differences_with_and_without_checkpointing(tiny_models):
    from convert.evaluate.fit import make_fit_loss

    src = open_source(tiny_models[("llama", False)])
    plain = make_fit_loss(src.path, src.spec, TARGET, {"samples": 2, "gradient_checkpointing": False},
                          fit_temperature=True)
    ckpt = make_fit_loss(src.path, src.spec, TARGET, {"samples": 2, "loss_chunk": 17}, fit_temperature=True)
    assert len(plain.windows) == 2 and plain.score_from == ORIGINAL and plain.tokens_per_step() == 2 * TARGET
    x = torch.linspace(0.0, math.log(SCALE), 8, dtype=torch.float64)
    a, b = plain(x, 1.1, 0), ckpt(x, 1.1, 0)
    assert a[0] == pytest.approx(b[0], rel=1e-6)
    assert torch.allclose(a[1], b[1], rtol=1e-4, atol=1e-6) and a[2] == pytest.approx(b[2], rel=1e-4)
    # central differences, each step small against the pair's period in ln lambda (about 2 pi / (p theta_i): the
    # fast pair 0 turns 0.26 rad at position 256 for a step of 1e-3) and large against float32's rounding
    for i, eps in ((0, 1e-4), (2, 1e-3), (5, 1e-2)):
        e = torch.zeros_like(x)
        e[i] = eps
        fd = (plain(x + e, 1.1, 0)[0] - plain(x - e, 1.1, 0)[0]) / (2 * eps)
        assert fd == pytest.approx(float(a[1][i]), rel=0.05), i
    eps = 1e-3
    fd_t = (plain(x, 1.1 + eps, 0)[0] - plain(x, 1.1 - eps, 0)[0]) / (2 * eps)
    assert fd_t == pytest.approx(a[2], rel=0.05)
    assert all(p.grad is None and not p.requires_grad for p in plain.model.parameters())


def test_the_loss_equals_the_baked_checkpoint_s(tiny_models, tmp_path):
    from transformers import AutoModelForCausalLM

    from convert.evaluate.fit import make_fit_loss
    from convert.stages.bake import bake, make_plan

    src_dir = tiny_models[("qwen2", False)]
    src = open_source(src_dir)
    factors = torch.tensor([1.0, 1.0, 1.13, 1.5, 2.24, 3.1, 3.9, 4.37])
    ctx = RopeContext(src.spec.inv_freq, src.spec.rope_theta, ORIGINAL, TARGET)
    r = run_method("factors", ctx, long=factors.tolist(), temperature=1.07)
    out = bake(src, tmp_path / "baked", make_plan("factors", TARGET, options={"long": factors.tolist(),
                                                                               "temperature": 1.07}),
               result=r, progress=False)
    loss = make_fit_loss(src.path, src.spec, TARGET, {"samples": 1})
    value = loss(factors.double().log(), 1.07, 0)[0]
    baked = AutoModelForCausalLM.from_pretrained(str(out)).eval()
    ids, targets = loss.windows[0]
    with torch.no_grad():
        logits = baked(ids).logits[0, ORIGINAL:].float()
    want = torch.nn.functional.cross_entropy(logits, targets[ORIGINAL:]).item()
    assert value == pytest.approx(want, rel=1e-4)


# ------------------------------------------------------------------------------------------- short windows (PoSE)
WINDOW = 32  # a short window: half the tiny models' original window, an eighth of the target


@pytest.fixture(scope="module")
def short_loss(tiny_models):
    """The fit's loss on 32-token windows with PoSE's skipped positions (2 chunks), 2 windows a step."""
    from convert.evaluate.fit import make_fit_loss

    src = open_source(tiny_models[("llama", False)])
    return make_fit_loss(src.path, src.spec, TARGET, {"window": WINDOW, "chunks": 2, "samples": 2, "seed": 0})


def test_short_windows_read_skipped_positions_and_the_fit_descends_through_them(short_loss):
    loss = short_loss
    assert loss.short and loss.length == WINDOW and loss.chunks == 2 and loss.score_from == ORIGINAL
    assert len(loss.windows) > 100 and loss.tokens_per_step() == 2 * WINDOW  # the pool: every 32-token window
    ident, label = loss.identity(), loss.label()
    assert ident["window"] == WINDOW and ident["chunks"] == 2 and ident["positions"] == "pose"
    assert ":window=32:chunks=2:" in label
    for step in range(3):
        inputs = loss.step_inputs(step)
        assert len(inputs) == 2
        for ids, targets, pos, first in inputs:
            p = pos[0]
            assert ids.shape == (1, WINDOW) and p[0] == 0 and p[-1] < TARGET and bool((p.diff() >= 1).all())
            assert p[-1] >= ORIGINAL  # redrawn until the window scores something
            assert first == int((p < ORIGINAL).sum())  # the scored targets: positions >= score_from
    # the same step draws the same windows and positions; another step others
    a, b = loss.step_inputs(1), loss.step_inputs(1)
    assert all(torch.equal(x[2], y[2]) and torch.equal(x[0], y[0]) for x, y in zip(a, b))
    assert any(not torch.equal(x[2], y[2]) for x, y in zip(a, loss.step_inputs(2)))
    # the gradient through the skipped positions: central differences on a slow pair
    ctx = RopeContext(loss.spec.inv_freq, loss.spec.rope_theta, ORIGINAL, TARGET)
    x = torch.linspace(0.0, math.log(SCALE), 8, dtype=torch.float64)
    _, g, gt = loss(x, 1.0, 0)
    assert gt is None
    e = torch.zeros_like(x)
    e[5] = 1e-2
    fd = (loss(x + e, 1.0, 0)[0] - loss(x - e, 1.0, 0)[0]) / 2e-2
    assert fd == pytest.approx(float(g[5]), rel=0.05)
    # the fit on one step's windows (a fixed objective): the factors move and the best loss is below the start's
    r = run_method("dprope-fit", ctx, loss_and_grad=lambda x, t, step: loss(x, t, 0), budget_steps=4, lr=0.1)
    s = r.params["search"]
    assert s["fitness"] < s["init"]["loss"] and s["best_step"] > 0
    assert not torch.allclose(torch.as_tensor(r.factors), torch.as_tensor(run_method("dprope", ctx).factors))
    assert satisfies(r.factors, SCALE)


def test_short_windows_score_only_the_targets_past_score_from(short_loss, tiny_models, monkeypatch):
    """A constructed case: window 0 at positions 0..9 and 100..121 scores its last 22 targets, window 1 at 0..31
    none; the value is the model's own loss on those 22 tokens under the same position ids."""
    import numpy as np

    from convert.evaluate.fitness import apply_factors, load_model

    loss = short_loss
    pos0 = np.concatenate([np.arange(0, 10), np.arange(100, 122)])
    monkeypatch.setattr(loss, "positions", lambda step, j: pos0 if j == 0 else np.arange(WINDOW))
    factors = torch.tensor([1.0, 1.0, 1.13, 1.5, 2.24, 3.1, 3.9, 4.37])
    value, _, _ = loss(factors.double().log(), 1.07, 0)
    assert loss.scored[-1] == 22
    model, _ = load_model(tiny_models[("llama", False)], device="cpu")  # a model of its own, baked in memory
    apply_factors(model, loss.spec, factors, 1.07)
    ids, targets, pos, first = loss.step_inputs(0)[0]
    assert first == 10 and torch.equal(pos[0], torch.from_numpy(pos0))
    with torch.no_grad():
        logits = model(ids, position_ids=pos, attention_mask=torch.ones_like(ids)).logits[0, first:].float()
    want = torch.nn.functional.cross_entropy(logits, targets[first:]).item()
    assert value == pytest.approx(want, rel=1e-4)
    # nothing scored at all: one clear error, no division by zero
    monkeypatch.setattr(loss, "positions", lambda step, j: np.arange(WINDOW))
    with pytest.raises(ConvertError, match="scored no token at step 0"):
        loss(factors.double().log(), 1.07, 0)


def test_an_interrupted_short_window_fit_resumes_to_the_uninterrupted_result(short_loss, tmp_path):
    loss = short_loss
    ctx = RopeContext(loss.spec.inv_freq, loss.spec.rope_theta, ORIGINAL, TARGET)
    cfg = dict(lr=0.05)
    whole = fit(ctx, loss, FitConfig(budget_steps=4, **cfg), state_path=tmp_path / "whole.json")
    # a budget of 2, then 4: the second run continues the first's state
    state = tmp_path / "budget.json"
    assert fit(ctx, loss, FitConfig(budget_steps=2, **cfg), state_path=state).steps == 2
    more = fit(ctx, loss, FitConfig(budget_steps=4, **cfg), state_path=state)
    # an exception from the loss at step 3, then the same call
    calls = []

    def dies_at_3(x, t, step):
        calls.append(step)
        if step == 3 and len(calls) == 4:
            raise KeyboardInterrupt
        return loss(x, t, step)

    dies_at_3.stochastic = loss.stochastic  # new windows every step: pick=auto averages the iterates
    assert loss.stochastic and whole.pick == "average"
    broken = tmp_path / "broken.json"
    with pytest.raises(KeyboardInterrupt):
        fit(ctx, dies_at_3, FitConfig(budget_steps=4, **cfg), state_path=broken)
    assert json.loads(broken.read_text())["step"] == 3
    resumed = fit(ctx, dies_at_3, FitConfig(budget_steps=4, **cfg), state_path=broken)
    assert calls == [0, 1, 2, 3, 3]
    for r in (more, resumed):
        assert torch.equal(torch.as_tensor(r.factors), torch.as_tensor(whole.factors)) and r.trace == whole.trace
        assert r.loss == whole.loss and r.steps == 4


def test_the_short_window_objective_scores_factor_sets_on_fixed_windows(short_loss):
    from convert.evaluate.fit import ShortWindowObjective

    loss = short_loss
    obj = ShortWindowObjective(loss.model, loss.tok, loss.spec, TARGET,
                               {"window": WINDOW, "samples": 2, "seed": 0, "steps": 2})
    ones, other = torch.ones(8), torch.linspace(1.0, 4.0, 8)
    a = obj(ones, 1.0)
    assert obj(ones, 1.0) == a and obj(other, 1.0) != a and obj(ones, 1.2) != a
    assert obj.tokens_per_call() == 2 * 2 * WINDOW and obj.identity()["steps"] == 2 and obj.scored[0] > 0
    # the fit's own loss at step 0 on the same options: the same value (the same windows, positions and scoring)
    one = ShortWindowObjective(loss.model, loss.tok, loss.spec, TARGET, {"window": WINDOW, "chunks": 2, "samples": 2,
                                                                         "seed": 0})
    assert one(ones, 1.0) == pytest.approx(loss(torch.zeros(8, dtype=torch.float64), 1.0, 0)[0], rel=1e-6)
    assert all(p.grad is None for p in loss.model.parameters())


# ------------------------------------------------------------------------------------------- the pipeline
def _fit_report(out: Path) -> dict:
    return json.loads((out / "dprope_factors.json").read_text())


def test_cli_extend_with_dprope_fit_lowers_the_loss_from_its_init(tiny_models, tmp_path):
    src_dir = tiny_models[("llama", False)]
    out = tmp_path / "out"
    res = CliRunner().invoke(main, ["extend", str(src_dir), str(out), "--target-length", str(TARGET), "--method",
                                    "dprope-fit", "--budget", "4", "--seed", "3", *FIT])
    assert res.exit_code == 0, res.output
    rep = _fit_report(out)
    s = rep["params"]["search"]
    assert s["kind"] == "fit" and s["evals"] == 4 and s["stopped"] == "budget_steps"
    assert s["fitness"] < s["init"]["loss"] and s["init"]["method"] == "dprope"
    assert [e["step"] for e in s["trace"]] == [0, 1, 2, 3] and s["tokens_per_step"] == 2 * TARGET
    cfg = json.loads((out / "config.json").read_text())
    long = cfg["rope_scaling"]["long_factor"]
    assert satisfies(long, SCALE) and long == pytest.approx(rep["factors"], rel=1e-6)
    assert cfg["dprope"]["options"]["seed"] == 3 and cfg["dprope"]["options"]["budget_steps"] == 4
    trace = json.loads((out / "search_trace.json").read_text())
    assert trace["kind"] == "fit" and trace["best_fitness"] == s["fitness"] and len(trace["trace"]) == 4
    assert (out / "search_trace.png").read_bytes()[:4] == b"\x89PNG"
    card = (out / "README.md").read_text()
    assert "- Factors from: fitted by gradient (dprope-fit): 4 Adam steps" in card and "from dprope's factors" in card
    (state,) = (tmp_path / "out.search").glob("state-*.json")
    assert json.loads(state.read_text())["step"] == 4


def test_interrupted_fit_through_the_cli_resumes_to_the_uninterrupted_result(tiny_models, tmp_path, monkeypatch):
    from convert.evaluate.fit import FitLoss

    src_dir = tiny_models[("qwen2", False)]
    args = ["--target-length", str(TARGET), "--method", "dprope-fit", "--budget", "5", *FIT]
    runner = CliRunner()
    whole = tmp_path / "whole"
    assert runner.invoke(main, ["extend", str(src_dir), str(whole), *args]).exit_code == 0
    real = FitLoss.__call__

    def dies_at_step_3(self, log_factors, temperature, step=0):
        if step >= 3:
            raise KeyboardInterrupt
        return real(self, log_factors, temperature, step)

    monkeypatch.setattr(FitLoss, "__call__", dies_at_step_3)
    out = tmp_path / "out"
    res = runner.invoke(main, ["extend", str(src_dir), str(out), *args])
    assert res.exit_code == 130 and "run the same command again to resume" in res.output
    assert not out.exists()
    (state,) = (tmp_path / "out.search").glob("state-*.json")
    assert json.loads(state.read_text())["step"] == 3
    monkeypatch.setattr(FitLoss, "__call__", real)
    res = runner.invoke(main, ["extend", str(src_dir), str(out), *args])
    assert res.exit_code == 0, res.output
    a, b = _fit_report(whole), _fit_report(out)
    assert a["factors"] == b["factors"] and a["temperature"] == b["temperature"]
    for key in ("trace", "evals", "fitness", "stopped", "best_step"):
        assert a["params"]["search"][key] == b["params"]["search"][key], key


@pytest.mark.parametrize("extra,msg", [
    ([], "dprope-fit needs a budget: --budget STEPS"),
    (["--budget", "2", "--fitness", "proxy"], "--fitness applies to longrope-search"),
    (["--budget", "2", "--opt", "lr=-1"], "lr must be a number > 0"),
    (["--budget", "2", "--opt", "high=twice"], "expression in the scale"),
    (["--budget", "2", "--opt", "init=nope"], "unknown method 'nope'"),
    (["--budget", "2", "--opt", "dtype=int8"], "dtype must be auto"),
    (["--budget", "2", "--opt", "steps=3"], r"no option(s) steps"),
    (["--budget", "2", "--opt", "window=32", "--opt", "fit_temperature=true"],
     "cannot measure the dilution the temperature compensates"),
    (["--budget", "2", "--opt", f"window={TARGET + 1}"], f"pass window < {TARGET}"),
    (["--budget", "2", "--opt", "window=8", "--opt", "chunks=9"], "window=8 is too short for chunks=9"),
    (["--budget", "2", "--opt", "window=32", "--opt", "chunks=0"], "chunks must be a whole number >= 1"),
    (["--budget", "2", "--opt", "window=32", "--opt", "length=128"], "length and window exclude each other"),
    (["--budget", "2", "--opt", "window=32", "--opt", "chunks=1"], "pass chunks >= 2 (skipped positions)"),
])
def test_bad_fit_inputs_are_one_clear_error(tiny_models, tmp_path, extra, msg):
    out = tmp_path / "out"
    res = CliRunner().invoke(main, ["extend", str(tiny_models[("llama", False)]), str(out), "--target-length",
                                    str(TARGET), "--method", "dprope-fit", *extra])
    assert res.exit_code == 2, res.output
    assert msg in res.output and res.output.count("error:") == 1 and "Traceback" not in res.output
    assert list(tmp_path.iterdir()) == []


def test_a_recipe_runs_the_fit(tiny_models, tmp_path):
    from convert.pipeline.recipe import load_recipe
    from convert.pipeline.run import run_recipe

    src_dir = tiny_models[("mistral", False)]

    def recipe(**options):
        p = tmp_path / "fit.yaml"
        p.write_text(yaml.safe_dump({"name": "tiny-fit", "source": str(src_dir), "target_length": TARGET,
                                     "method": {"name": "dprope-fit", "options": options},
                                     "validate": {"tasks": ["ppl"], "lengths": [TARGET], "limit": 1}}))
        return p

    run = tmp_path / "run"
    run_recipe(recipe(budget_steps=2, samples=1, lr=0.01), run, stop="bake", echo=lambda *_: None)
    assert json.loads((run / "factors.json").read_text())["params"]["search"]["evals"] == 2
    assert (run / "hf" / "search_trace.png").exists()
    run_recipe(recipe(budget_steps=3, samples=1, lr=0.01), run, stop="bake", echo=lambda *_: None)
    (state,) = (run / "search").glob("state-*.json")
    assert json.loads(state.read_text())["step"] == 3  # a larger budget continued the same state
    with pytest.raises(ConvertError, match="needs a budget"):
        load_recipe(recipe(samples=1))


# ------------------------------------------------------------------------------------------- several processes
def _torchrun(args: list[str], nproc: int) -> str:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
           "-m", "convert.cli", *args]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT)
    try:
        log, _ = proc.communicate(timeout=LAUNCH_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        proc.terminate()  # the launcher stops its workers before it exits
        log, _ = proc.communicate()
        raise AssertionError(f"the launch did not finish in {LAUNCH_TIMEOUT_S} s (a collective waiting for a "
                             "process that never joined?):\n" + log[-3000:]) from None
    assert proc.returncode == 0, log[-5000:]
    return log


@pytest.fixture
def one_thread():
    """One intra-op thread here, as each launched process has (OMP_NUM_THREADS=1): the same kernels, the same
    floating-point sums."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.slow  # two processes
def test_two_gloo_processes_fit_as_one(tiny_models, tmp_path, one_thread):
    src_dir = tiny_models[("llama", False)]
    args = ["--target-length", str(TARGET), "--method", "dprope-fit", "--budget", "3", *FIT]
    one = tmp_path / "one"
    assert CliRunner().invoke(main, ["extend", str(src_dir), str(one), *args]).exit_code == 0
    two = tmp_path / "two"
    _torchrun(["extend", str(src_dir), str(two), *args], nproc=2)
    a, b = _fit_report(one), _fit_report(two)
    assert b["params"]["search"]["processes"] == 2 and a["params"]["search"]["processes"] == 1
    # each rank scored one of the two windows; the sums all-reduced: the same numbers up to their order
    assert torch.allclose(torch.tensor(a["factors"]), torch.tensor(b["factors"]), rtol=1e-5)
    for x, y in zip(a["params"]["search"]["trace"], b["params"]["search"]["trace"]):
        assert x["loss"] == pytest.approx(y["loss"], rel=1e-6)
    assert len(list((tmp_path / "two.search").glob("state-*.json"))) == 1  # rank 0 alone wrote the state


@pytest.mark.slow  # two processes
def test_two_gloo_processes_search_exactly_as_one(tiny_models, tmp_path, one_thread):
    src_dir = tiny_models[("llama", False)]
    args = ["--target-length", str(TARGET), "--method", "longrope-search", "--budget", "14", "--fitness",
            "proxy:chunk=24:samples=2", "--seed", "5", "--opt", "population=6", "--opt", "parents=3", "--opt",
            "mutations=2", "--opt", "crossovers=2"]
    one = tmp_path / "one"
    assert CliRunner().invoke(main, ["extend", str(src_dir), str(one), *args]).exit_code == 0
    two = tmp_path / "two"
    _torchrun(["extend", str(src_dir), str(two), *args], nproc=2)
    a, b = _fit_report(one), _fit_report(two)
    assert a["factors"] == b["factors"] and a["temperature"] == b["temperature"]
    for key in ("trace", "evals", "fitness", "stopped"):
        assert a["params"]["search"][key] == b["params"]["search"][key], key


# ------------------------------------------------------------------------------------------- the searched preset
PRESET = ROOT / "recipes" / "smollm2" / "135m_32k_searched.yaml"


def test_the_searched_preset_carries_the_gpu_search_s_factors_and_where_they_came_from():
    from convert.pipeline.recipe import load_recipe

    r = load_recipe(PRESET)
    assert PRESET.read_text().splitlines()[0].startswith("# make smollm2-135m-32k-searched")
    assert r.method.name == "factors" and r.target_length == 32768
    factors_file = ROOT / r.method.options["long"]
    assert factors_file.is_file()
    long = json.loads(factors_file.read_text())["long_factor"]
    assert len(long) == 32  # SmolLM2-135M: head_dim 64, 32 rotary pairs
    assert satisfies(long, 4.0)  # LongRoPE's constraints: monotone, within [1, 1 + s]
    prov = r.method.options["provenance"]
    for piece in ("longrope-search", "1,344", "seed 0", "pydoc", "H100"):
        assert piece in prov, piece
    ctx = _ctx(n_pairs=32, original=8192, target=32768, theta=100000.0)
    res = run_method("factors", ctx, **{**r.method.options, "long": str(factors_file)})
    assert res.factors.tolist() == pytest.approx(long) and res.params["provenance"] == prov
    assert res.temperature == pytest.approx(math.sqrt(1 + math.log(4) / math.log(8192)))
    # without an explicit provenance, the file's own note is carried
    bare = run_method("factors", ctx, long=str(factors_file))
    assert "LongRoPE's full search" in bare.params["provenance"]


@pytest.mark.slow  # the real SmolLM2, dequantised
def test_the_searched_preset_bakes_on_a_cpu(tmp_path, monkeypatch):
    from test_smollm2 import smollm2_gguf

    from convert.pipeline.recipe import load_recipe
    from convert.pipeline.run import run_recipe

    smollm2_gguf()  # skips without the package
    monkeypatch.chdir(ROOT)  # the recipe names its factors file from the repository root, as make runs it
    run_recipe(PRESET, tmp_path / "run", stop="bake", echo=lambda *_: None)
    cfg = json.loads((tmp_path / "run" / "hf" / "config.json").read_text())
    rope = cfg.get("rope_scaling") or cfg["rope_parameters"]
    r = load_recipe(PRESET)
    want = json.loads((ROOT / r.method.options["long"]).read_text())
    assert rope["long_factor"] == pytest.approx(want["long_factor"], rel=1e-6)
    assert rope["attention_factor"] == pytest.approx(want["temperature"], rel=1e-9)
    card = (tmp_path / "run" / "hf" / "README.md").read_text()
    assert "- Factors from: LongRoPE's evolutionary search (longrope-search" in card


def test_pick_average_returns_the_mean_of_the_iterates_not_the_luckiest_step(tmp_path):
    """A loss whose noise differs step by step (short windows draw new text each step): "best" picks the step with
    the luckiest noise; "average" returns the mean of the evaluated points from average_from on, which lies nearer
    the minimum than the noisy iterates, and keeps the constraints (they are convex)."""
    ctx = _ctx()
    target = torch.linspace(0.2, 1.2, ctx.n_pairs, dtype=torch.float64)
    gen = torch.Generator().manual_seed(0)
    noise = [torch.randn(ctx.n_pairs, generator=gen, dtype=torch.float64) * 0.5 for _ in range(60)]
    offsets = torch.randn(60, generator=gen, dtype=torch.float64).abs() * 2  # text that is easier or harder

    def noisy(x, t, step):
        d = x - target
        return float((d * d).sum() + offsets[step]), 2 * d + noise[step], None

    base = dict(budget_steps=60, lr=0.05, guard=None)
    best = fit(ctx, noisy, FitConfig(**base))  # pick=auto: a plain callable is taken for a deterministic loss
    assert best.pick == "best"
    avg = fit(ctx, noisy, FitConfig(**base, pick="average", average_from=0.5))
    want = torch.tensor(project(target.tolist(), 0.0, math.log(1 + SCALE), True))
    err = lambda r: float((r.factors.double().log() - want).norm())  # noqa: E731
    assert avg.best_step == 30 and err(avg) < err(best)
    assert avg.loss == pytest.approx(sum(e["loss"] for e in avg.trace[30:]) / 30)
    assert satisfies(avg.factors, SCALE)
    # the average is of the evaluated points, kept in the state: a run in two parts ends the same
    state = tmp_path / "fit.json"
    fit(ctx, noisy, FitConfig(**{**base, "budget_steps": 40}, pick="average", average_from=30), state_path=state)
    again = fit(ctx, noisy, FitConfig(**base, pick="average", average_from=30), state_path=state)
    assert torch.equal(again.factors, avg.factors) and again.loss == avg.loss
    # pick=auto averages for a loss that says it is stochastic (convert/evaluate/fit.py FitLoss with short windows)
    noisy.stochastic = True
    auto = fit(ctx, noisy, FitConfig(**base))
    assert auto.pick == "average" and torch.equal(auto.factors, avg.factors)
    with pytest.raises(dprope.DPRoPEError, match="pick must be auto, best or average"):
        FitConfig(budget_steps=1, pick="median")


# ------------------------------------------------------------------------------------------- the YaRN space
def _yarn_bowl(best_length: int, head_dim: int, theta: float, target: int, calls: list | None = None):
    """A loss whose minimum over the YaRN space is at original_context_length ``best_length``: the squared
    distance of the log-factors to that member's."""
    from dprope.yarn_fit import yarn_factors

    want = torch.tensor(yarn_factors(head_dim, theta, target / best_length, best_length)).log()

    def loss_and_grad(x, t, step):
        if calls is not None:
            calls.append(step)
        d = x - want
        return float((d * d).sum()), 2 * d, None

    return loss_and_grad


def test_the_yarn_scan_finds_the_member_the_loss_prefers_and_resumes(tmp_path):
    from dprope.yarn_fit import fit_yarn, stable_length

    theta, head_dim, original, target = 10000.0, 64, 4096, 16384
    ctx = RopeContext(dprope.base_inv_freq(theta, head_dim), theta, original, target)
    calls: list = []
    loss = _yarn_bowl(2000, head_dim, theta, target, calls)
    cfg = FitConfig(space="yarn", budget_steps=30, scan_steps=2)
    state = tmp_path / "scan.json"
    res = fit(ctx, loss, cfg, state_path=state)
    lengths = [e["original_length"] for e in res.trace]
    best = lengths[res.best_step]
    assert abs(best / 2000 - 1) < 0.05 and res.stopped == "converged" and res.steps == len(set(lengths)) < 30
    assert stable_length(head_dim, theta, original, 2, target - 1) in lengths  # llama.cpp's own YaRN scored too
    assert res.init["loss"] > res.loss and res.init["method"] == "yarn" and res.pick == "best"
    assert len(calls) == 2 * res.steps  # every candidate read steps 0 and 1 of the loss
    # the result is exactly a YaRN member: what a GGUF carries for a YaRN-only graph, with no error
    f = target / best
    y = fit_yarn(res.factors.double().numpy(), head_dim, theta, original, target)
    assert (y.original_length, y.factor) == (best, pytest.approx(f)) and y.max_log_error < 1e-6
    assert res.temperature == pytest.approx(1 + 0.1 * math.log(f))
    # each candidate read at the temperature the runtime applies with it (YaRN's own), or all at the init's
    assert all(e["temperature"] == pytest.approx(1 + 0.1 * math.log(e["factor"])) for e in res.trace)
    fixed = fit(ctx, _yarn_bowl(2000, head_dim, theta, target), FitConfig(space="yarn", budget_steps=3,
                                                                          scan_temperature="fixed"))
    assert len({e["temperature"] for e in fixed.trace}) == 1
    # resumed from its state: nothing evaluated again, the same answer
    calls.clear()
    again = fit(ctx, loss, cfg, state_path=state)
    assert calls == [] and again.best_step == res.best_step and torch.equal(again.factors, res.factors)
    # a minimum outside the first range (0.25 .. 1.25 x the original window): the scan walks past its edge to it
    far = fit(ctx, _yarn_bowl(400, head_dim, theta, target), FitConfig(space="yarn", budget_steps=40))
    assert abs(far.trace[far.best_step]["original_length"] / 400 - 1) < 0.05 and far.stopped == "converged"
    # a smaller budget stops early; another setting is another fit
    short = fit(ctx, _yarn_bowl(2000, head_dim, theta, target), FitConfig(space="yarn", budget_steps=3))
    assert short.steps == 3 and short.stopped == "budget_steps"
    with pytest.raises(dprope.DPRoPEError, match="belongs to another fit"):
        fit(ctx, loss, FitConfig(space="yarn", budget_steps=30, scan_steps=1), state_path=state)
    with pytest.raises(dprope.DPRoPEError, match="space must be pairs"):
        FitConfig(space="ntk")


def test_a_short_window_yarn_fit_of_gemma3_runs_through_the_cli(tmp_path, tokenizer):
    """Gemma 3 (sliding layers plus global ones): the scan through `dprope extend`, on short windows whose sliding
    layers read contiguous positions; the output's factors are one YaRN member, which a GGUF carries exactly."""
    from convert.formats.gguf_extend import gguf_form
    from tiny import make_tiny

    src_dir = make_tiny(tmp_path / "gemma", "gemma3_text", tokenizer=tokenizer)
    out = tmp_path / "out"
    res = CliRunner().invoke(main, ["extend", str(src_dir), str(out), "--target-length", str(TARGET), "--method",
                                    "dprope-fit", "--budget", "12", "--opt", "space=yarn", "--opt",
                                    f"window={WINDOW}", "--opt", "samples=2", "--opt", "scan_points=4"])
    assert res.exit_code == 0, res.output
    rep = _fit_report(out)
    s = rep["params"]["search"]
    assert s["kind"] == "yarn-scan" and 4 <= s["evals"] <= 12 and s["fitness"] <= s["init"]["loss"]
    best = s["trace"][s["best_step"]]
    assert best["loss"] == s["fitness"] and best["factor"] == pytest.approx(TARGET / best["original_length"])
    assert "- Factors from: YaRN fitted by the loss (dprope-fit, space=yarn)" in (out / "README.md").read_text()
    assert (out / "search_trace.png").read_bytes()[:4] == b"\x89PNG"
    spec = open_source(src_dir).spec
    form = gguf_form(spec, rep["factors"], TARGET, rep["temperature"])
    assert form["form"] == "yarn-fit" and form["fit"].original_length == best["original_length"]
    assert form["fit"].max_log_error < 1e-6
    # the preset a recipe bakes as given: the same factors and temperature, the provenance with the command
    import fit_preset  # bench/ is on the path (conftest.py)

    p = fit_preset.preset(rep, "make fit-gemma3-yarn", "2026-01-01")
    assert p["factors"] == pytest.approx(rep["factors"]) and p["temperature"] == rep["temperature"]
    assert p["provenance"].endswith("`make fit-gemma3-yarn`") and "2026-01-01" in p["provenance"]
    assert p["fit"]["kind"] == "yarn-scan" and p["trace"] == s["trace"]


def test_span_weighted_short_windows_run_and_change_the_loss(short_loss, tiny_models):
    """weights=span: the 4D mask reaches the attention (the loss moves, the gradient stays finite); plain windows
    are its weights-1 case."""
    from convert.evaluate.fit import make_fit_loss

    src = open_source(tiny_models[("llama", False)])
    weighted = make_fit_loss(src.path, src.spec, TARGET, {"window": WINDOW, "chunks": 2, "samples": 2, "seed": 0,
                                                          "weights": "span"}, loaded=(short_loss.model, short_loss.tok))
    x = torch.zeros(8, dtype=torch.float64)
    a, b = short_loss.value(x, 1.0, 1), weighted.value(x, 1.0, 1)
    assert math.isfinite(b) and abs(a - b) > 1e-4
    loss, grad, _ = weighted(x, 1.0, 0)
    assert loss == pytest.approx(b, rel=1e-5) and bool(torch.isfinite(torch.as_tensor(grad)).all())
    assert ":weights=span:" in weighted.label() and weighted.identity()["weights"] == "span"
