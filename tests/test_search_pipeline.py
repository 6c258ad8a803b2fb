"""LongRoPE's search through the pipeline on tiny random checkpoints: fitness functions that apply factors in
memory (checked against a real bake and against lm-eval), `dprope extend --method longrope-search`, resumption
after an interruption, recipes, and one clear error for each bad input."""

import json
import math
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner

from convert.stages.bake import bake, make_plan
from convert.cli import main
from convert.errors import ConvertError
from convert.evaluate.fitness import FitnessSpec, ProxyFitness, apply_factors, load_model, make_fitness
from convert.formats.checkpoint import open_source
from dprope.freqs import RopeContext
from dprope.search import is_valid
from tiny import ORIGINAL, edit_config

TARGET = 4 * ORIGINAL
# a small search: 6 initial individuals, 4 children per iteration
SMALL = ["--opt", "population=6", "--opt", "parents=3", "--opt", "mutations=2", "--opt", "crossovers=2"]
PROXY = "proxy:chunk=24:samples=2"


def _result(src, factors, temperature):
    """A result holding given factors (what a search hands the bake)."""
    from dprope.methods import _compute

    spec = src.spec
    ctx = RopeContext(spec.inv_freq, spec.rope_theta, spec.original_length, TARGET)
    r = _compute(ctx, candidates=[], extra_candidates={"given": torch.as_tensor(factors, dtype=torch.float32)})
    r.temperature = float(temperature)
    r.method = "longrope-search"
    return r


def _bake_factors(src_dir, out, factors, temperature):
    src = open_source(src_dir)
    plan = make_plan("longrope-search", TARGET, options={"budget_evals": 1})
    return bake(src, out, plan, result=_result(src, factors, temperature), progress=False)


FACTORS = torch.tensor([1.0, 1.0, 1.13, 1.5, 2.24, 3.1, 3.9, 4.37])  # monotone, on the grid, within [1, 1 + s]


def _llama3_base(tiny_copy):
    src = tiny_copy("llama")
    edit_config(src, rope_parameters={"rope_type": "llama3", "rope_theta": 10000.0, "factor": 4.0,
                                      "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                      "original_max_position_embeddings": 16}, max_position_embeddings=64)
    return src


@pytest.mark.parametrize("base", ["llama", "qwen2", "llama3-scaled"])
def test_factors_in_memory_equal_a_real_bake(tiny_models, tiny_copy, tmp_path, base):
    """The fitness's in-memory factors give the baked checkpoint's frequencies, temperature and logits."""
    from transformers import AutoModelForCausalLM

    src_dir = _llama3_base(tiny_copy) if base == "llama3-scaled" else tiny_models[(base, False)]
    out = _bake_factors(src_dir, tmp_path / "baked", FACTORS, 1.07)
    baked = AutoModelForCausalLM.from_pretrained(str(out)).eval()
    model, _ = load_model(src_dir)
    spec = open_source(src_dir).spec
    ids = torch.randint(3, 400, (1, TARGET - 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = model(ids).logits
        want = baked(ids).logits
        apply_factors(model, spec, FACTORS, 1.07)
        got = model(ids).logits
    assert torch.equal(model.model.rotary_emb.inv_freq, baked.model.rotary_emb.inv_freq)
    assert model.model.rotary_emb.attention_scaling == pytest.approx(baked.model.rotary_emb.attention_scaling,
                                                                     rel=1e-12)
    assert (got - want).abs().max() < 1e-5
    assert (before - want).abs().max() > 1e-2  # the factors matter at these positions


def test_ppl_fitness_equals_lm_eval_on_the_baked_checkpoint(tiny_models, tmp_path):
    from convert.evaluate.engine import Run, load_hf_eval, model_hash, run_one

    src_dir = tiny_models[("llama", False)]
    out = _bake_factors(src_dir, tmp_path / "baked", FACTORS, 1.07)
    spec = open_source(src_dir).spec
    fit = make_fitness("ppl:samples=2", src_dir, spec, TARGET)
    value = fit(FACTORS, 1.07)
    model, tok = load_hf_eval(out)
    ref = run_one(model, tok, Run("x", out, model_hash(out)), "ppl", TARGET, 2, None, TARGET, tmp_path / "evals")
    assert value == pytest.approx(ref["metrics"]["token_perplexity"], rel=1e-6)
    assert fit.score(model) == pytest.approx(value, rel=1e-6)
    assert len(fit.seconds) == 1 and fit.identity()["kind"] == "ppl"


@pytest.mark.parametrize("task", ["text", "key"])
def test_proxy_scores_the_far_chunk_against_the_first(tiny_models, tmp_path, task):
    """Sparse positions: the first chunk at [0, k), the scored one ending at L' - 1; the score depends on the first
    chunk (a mask that split them at the position jump would hide it) and equals the baked checkpoint's."""
    from transformers import AutoModelForCausalLM

    src_dir = tiny_models[("llama", False)]
    spec = open_source(src_dir).spec
    k = 48
    fit = make_fitness(f"proxy:task={task}:chunk={k}:samples=3", src_dir, spec, TARGET)
    assert len(fit.samples) == 3
    for s in fit.samples:
        pos = s.forward["position_ids"][0].tolist()
        assert pos[:k] == list(range(k)) and pos[-1] == TARGET - 1 - (task == "key") and len(pos) == 2 * k - (
            task == "key")
        assert s.n_tokens == len(s.targets) and (s.n_tokens == k if task == "text" else 1 <= s.n_tokens < 8)
    value = fit(FACTORS, 1.07)
    out = _bake_factors(src_dir, tmp_path / "baked", FACTORS, 1.07)
    assert fit.score(AutoModelForCausalLM.from_pretrained(str(out)).eval()) == pytest.approx(value, rel=1e-5)
    # replace the first chunk's tokens (the prefix token kept): the score changes
    for s in fit.samples:
        s.input_ids[0, 1:k] = (s.input_ids[0, 1:k] + 7) % 400 + 3
    assert fit.score() != pytest.approx(value, rel=1e-4)
    assert fit(torch.ones(8), 1.0) != pytest.approx(value, rel=1e-3)  # and it depends on the factors


def test_fitness_specs_parse_and_refuse_unknown_names():
    assert FitnessSpec.parse("proxy:samples=8:chunk=512").resolved()["samples"] == 8
    assert FitnessSpec.parse({"kind": "ppl", "samples": 1}).text() == "ppl:samples=1"
    assert FitnessSpec.parse(None).kind == "ppl"  # the proxy ranks only partly like it: not the default
    with pytest.raises(ConvertError, match="unknown fitness 'nope'.*proxy, ppl"):
        FitnessSpec.parse("nope")
    with pytest.raises(ConvertError, match=r"no option\(s\) bogus"):
        FitnessSpec.parse("proxy:bogus=1")


def _constraints_hold(out: Path, src_dir: Path):
    cfg = json.loads((out / "config.json").read_text())
    spec = open_source(src_dir).spec
    factors = torch.tensor(cfg["rope_scaling"]["long_factor"]) / torch.from_numpy(spec.prior_factors)
    assert is_valid(factors, TARGET / ORIGINAL, 0.01), factors  # monotone, on the 0.01 grid, in [1, 1 + s]
    rep = json.loads((out / "dprope_factors.json").read_text())
    assert torch.allclose(torch.tensor(rep["factors"]), factors, atol=1e-6)
    return cfg, rep


def test_cli_extend_with_longrope_search(tiny_models, tmp_path):
    src_dir = tiny_models[("llama", False)]
    out = tmp_path / "out"
    res = CliRunner().invoke(main, ["extend", str(src_dir), str(out), "--target-length", str(TARGET), "--method",
                                    "longrope-search", "--budget", "14", "--fitness", PROXY, "--seed", "5", *SMALL])
    assert res.exit_code == 0, res.output
    cfg, rep = _constraints_hold(out, src_dir)
    s = rep["params"]["search"]
    assert s["evals"] == 14 and s["stopped"] == "budget_evals" and s["config"]["seed"] == 5
    assert s["fitness_spec"] == PROXY and s["seconds_per_eval"] > 0
    assert cfg["dprope"]["method"] == "longrope-search" and cfg["dprope"]["options"]["fitness"] == PROXY
    assert cfg["rope_scaling"]["attention_factor"] == pytest.approx(math.sqrt(1 + math.log(4) / math.log(ORIGINAL)))
    trace = json.loads((out / "search_trace.json").read_text())
    assert trace["evals"] == 14 and [e["iteration"] for e in trace["trace"]] == [0, 1, 2]
    assert all(e["best"] <= e["median"] for e in trace["trace"]) and trace["best_fitness"] == s["fitness"]
    assert trace["trace"][-1]["best"] == pytest.approx(s["fitness"])
    assert (out / "search_trace.png").read_bytes()[:4] == b"\x89PNG"
    states = list((tmp_path / "out.search").glob("state-*.json"))
    assert len(states) == 1 and json.loads(states[0].read_text())["evals"] == 14
    assert "--method longrope-search" in (out / "dprope_recipe.yaml").read_text()
    assert f"- Search: `{PROXY}` fitness, 14 evaluations (stopped: budget_evals)" in (out / "README.md").read_text()


def test_interrupted_search_resumes_to_the_uninterrupted_result(tiny_models, tmp_path, monkeypatch):
    src_dir = tiny_models[("qwen2", False)]
    args = ["--target-length", str(TARGET), "--method", "longrope-search", "--budget", "18", "--fitness", PROXY,
            *SMALL]
    runner = CliRunner()
    whole = tmp_path / "whole"
    assert runner.invoke(main, ["extend", str(src_dir), str(whole), *args]).exit_code == 0
    calls = {"n": 0}
    real = ProxyFitness.__call__

    def dies_after_9(self, factors, temperature):
        if calls["n"] >= 9:
            raise KeyboardInterrupt
        calls["n"] += 1
        return real(self, factors, temperature)

    monkeypatch.setattr(ProxyFitness, "__call__", dies_after_9)
    out = tmp_path / "out"
    res = runner.invoke(main, ["extend", str(src_dir), str(out), *args])
    assert res.exit_code == 130 and "run the same command again to resume" in res.output
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    (state,) = (tmp_path / "out.search").glob("state-*.json")
    assert json.loads(state.read_text())["evals"] == 9
    monkeypatch.setattr(ProxyFitness, "__call__", real)
    res = runner.invoke(main, ["extend", str(src_dir), str(out), *args])
    assert res.exit_code == 0, res.output
    a = json.loads((whole / "dprope_factors.json").read_text())
    b = json.loads((out / "dprope_factors.json").read_text())
    assert a["factors"] == b["factors"] and a["temperature"] == b["temperature"]
    for key in ("trace", "evals", "fitness", "stopped"):
        assert a["params"]["search"][key] == b["params"]["search"][key], key
    assert json.loads(state.read_text())["evals"] == 18


@pytest.mark.parametrize("extra,msg", [
    ([], "needs a budget: --budget N"),
    (["--budget", "5", "--fitness", "nope"], "unknown fitness 'nope'"),
    (["--budget", "5", "--fitness", "proxy:bogus=1"], r"no option(s) bogus"),
    (["--budget", "5", "--opt", "parents=99"], "cannot exceed the population"),
    (["--time-budget", "0"], "--time-budget"),
])
def test_bad_search_inputs_are_one_clear_error(tiny_models, tmp_path, extra, msg):
    out = tmp_path / "out"
    res = CliRunner().invoke(main, ["extend", str(tiny_models[("llama", False)]), str(out), "--target-length",
                                    str(TARGET), "--method", "longrope-search", *extra])
    assert res.exit_code == 2, res.output
    assert msg in res.output and res.output.count("rror") == 1 and "Traceback" not in res.output
    assert list(tmp_path.iterdir()) == []  # no output, no search state


def test_search_flags_belong_to_search_methods(tiny_models, tmp_path):
    res = CliRunner().invoke(main, ["extend", str(tiny_models[("llama", False)]), str(tmp_path / "o"),
                                    "--target-length", str(TARGET), "--method", "yarn", "--budget", "5"])
    assert res.exit_code == 2 and "apply to search methods" in res.output
    res = CliRunner().invoke(main, ["factors", "--rope-theta", "10000", "--head-dim", "16", "--original-length",
                                    "64", "--target-length", "256", "--method", "longrope-search"])
    assert res.exit_code == 2 and "dprope extend" in res.output and res.output.count("error:") == 1
    assert list(tmp_path.iterdir()) == []


def _recipe(tmp_path, src_dir, **options) -> Path:
    p = tmp_path / "search.yaml"
    p.write_text(yaml.safe_dump({
        "name": "tiny-search", "source": str(src_dir), "target_length": TARGET,
        "method": {"name": "longrope-search", "options": options},
        "validate": {"tasks": ["ppl"], "lengths": [TARGET], "limit": 1}}))
    return p


def test_recipe_runs_the_search_and_resumes_from_its_state(tiny_models, tmp_path):
    from convert.pipeline.recipe import load_recipe
    from convert.pipeline.run import run_recipe

    src_dir = tiny_models[("mistral", False)]
    opts = dict(fitness=PROXY, budget_evals=10, population=6, parents=3, mutations=2, crossovers=2)
    run = tmp_path / "run"
    run_recipe(_recipe(tmp_path, src_dir, **opts), run, stop="bake", echo=lambda *_: None)
    _constraints_hold(run / "hf", src_dir)
    assert json.loads((run / "factors.json").read_text())["params"]["search"]["evals"] == 10
    assert (run / "hf" / "search_trace.json").exists() and (run / "hf" / "search_trace.png").exists()
    # a larger budget continues the same state: 10 done, 6 more
    run_recipe(_recipe(tmp_path, src_dir, **{**opts, "budget_evals": 16}), run, stop="bake", echo=lambda *_: None)
    (state,) = (run / "search").glob("state-*.json")
    assert json.loads(state.read_text())["evals"] == 16
    assert json.loads((run / "hf" / "search_trace.json").read_text())["evals"] == 16
    with pytest.raises(ConvertError, match="needs a budget"):
        load_recipe(_recipe(tmp_path, src_dir, fitness="proxy"))
    with pytest.raises(ConvertError, match="unknown fitness"):
        load_recipe(_recipe(tmp_path, src_dir, fitness="full", budget_evals=3))


@pytest.mark.runtime
def test_searched_factors_export_and_verify(tiny_models, tmp_path):
    from convert.stages.export import export_outputs
    from convert.stages.verify import verify

    src_dir = tiny_models[("llama", False)]
    out = tmp_path / "hf"
    res = CliRunner().invoke(main, ["extend", str(src_dir), str(out), "--target-length", str(TARGET), "--method",
                                    "longrope-search", "--budget", "8", "--fitness", PROXY, *SMALL])
    assert res.exit_code == 0, res.output
    export_outputs(out, tmp_path / "export", ("f32",), progress=False)
    report = verify(tmp_path / "export", out)
    assert report.ok, report.table()
