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
    assert torch.equal(r.factors[:11], init[:11]) and not torch.equal(r.factors[11:], init[11:])
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
