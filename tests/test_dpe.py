"""DPE: the grouping and sweep (dprope.dpe, synthetic scorers), `dprope extend --method dpe` end to end on a tiny
model, and DPE's attention runtime against plain attention and a naive per-position oracle (tests/reference_dpe.py).
"""

import copy
import json
import math

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import dprope
from convert.cli import main
from convert.errors import ConvertError
from dprope import DPRoPEError
from dprope.dpe import (DPE_MULTIPLIERS, choose, detect, group_bounds, grouped_key_position, grouped_query_position,
                        held_scale, pair_scales, sweep_plan, sweep_values)
from dprope.freqs import RopeContext
from dprope.methods import available_methods, get_method, run_method

CTX = RopeContext(dprope.base_inv_freq(1e4, 128), 1e4, 8192, 131072)  # DPE's Llama-3 setting: 64 pairs, 8k -> 128k


# ----------------------------------------------------------------------------------------------- pure
def test_groups_as_dpe_and_scaled_to_other_head_dims():
    assert group_bounds(64) == [0, 8, 16, 24, 32, 40, 48, 56, 64]  # DPE's dimension_groups_range
    assert group_bounds(32) == [0, 4, 8, 12, 16, 20, 24, 28, 32]  # same eight bands of the spectrum
    assert group_bounds(32, 4) == [0, 8, 16, 24, 32]
    b = group_bounds(10, 4)
    assert b[0] == 0 and b[-1] == 10 and len(b) == 5 and all(y > x for x, y in zip(b, b[1:]))
    assert group_bounds(4, 8) == [0, 1, 2, 3, 4]  # at most one group per pair
    assert group_bounds(8, [0, 3, 8]) == [0, 3, 8]
    for bad in ([0, 5, 4, 8], [1, 8], [0, 4], 0, 2.5):
        with pytest.raises(DPRoPEError):
            group_bounds(8, bad)


def test_pair_scales_give_each_pair_its_group_scale():
    f = pair_scales([0, 2, 5, 8], [2.0, 32.0, 4.0])
    assert f.dtype == torch.float32 and f.tolist() == [2, 2, 32, 32, 32, 4, 4, 4]
    with pytest.raises(DPRoPEError, match="3 groups need 3 scales"):
        pair_scales([0, 2, 5, 8], [2.0, 3.0])
    with pytest.raises(DPRoPEError, match="> 0"):
        pair_scales([0, 2, 5, 8], [2.0, 0.0, 1.0])


def test_sweep_values_follow_run_niah_detect():
    # TEST_MAX_LENGTH 131072, PRETRAIN_LENGTH 8192: factor 32; factor/16 .. factor*16
    assert held_scale(CTX) == 32
    assert sweep_values(32) == [2, 8, 16, 32, 64, 128, 512]
    assert sweep_values(4) == [1, 2, 4, 8, 16, 64]  # 4/16 would push positions past the trained range
    assert sweep_values(4, min_scale=0.25)[0] == 0.25
    with pytest.raises(DPRoPEError, match="no sweep value"):
        sweep_values(4, (0.1, 0.2))
    p = sweep_plan(CTX)
    assert p.n_groups == 8 and p.calls == 8 * 6 + 1  # the all-held configuration is shared


def test_grouped_positions_are_self_extends():
    pos = torch.arange(0, 20)
    s = torch.tensor([1.0, 4.0])
    gq, gk = grouped_query_position(pos, s, 8), grouped_key_position(pos, s)
    assert torch.equal(gq[:, 0], pos.double()) and torch.equal(gk[:, 0], pos.double())  # scale 1: true positions
    assert gk[:, 1].tolist() == [p // 4 for p in range(20)]
    assert gq[:, 1].tolist() == [p // 4 + 8 - 2 for p in range(20)]
    # the grouped distance at the window's edge continues the normal one (Self-Extend's shift)
    assert gq[8, 1] - gk[0, 1] == 8


def test_choose_prefers_the_score_then_the_held_scale():
    assert choose([1, 2, 4, 8], [0.1, 0.9, 0.2, 0.3], held=4) == 1
    assert choose([1, 2, 4, 8], [0.5, 0.5, 0.5, 0.5], held=4) == 2
    assert choose([2, 8], [0.5, 0.5], held=4) == 0  # equally far in log: the smaller
    assert choose([1, 2], [float("nan"), -3.0], held=1) == 1


class Synthetic:
    """A scorer with a known best scale per group (not monotone), separable over groups; records every call."""

    def __init__(self, bounds, best):
        self.bounds, self.best, self.calls = bounds, best, []

    def __call__(self, f):
        assert f.dtype == torch.float32 and f.shape == (self.bounds[-1],)
        self.calls.append(tuple(f.tolist()))
        per_group = [float(f[a]) for a in self.bounds[:-1]]
        return -sum((math.log(s) - math.log(b)) ** 2 for s, b in zip(per_group, self.best))


def test_detection_finds_the_best_scale_of_every_group():
    bounds = group_bounds(64)
    best = [2, 8, 2, 8, 32, 32, 512, 128]  # not monotone, as DPE's are
    sc = Synthetic(bounds, best)
    seen = []
    det = detect(CTX, sc, progress=seen.append)
    assert det.scales == best and det.bounds == bounds and det.held == 32
    assert det.evals == len(sc.calls) == len(set(sc.calls)) == sweep_plan(CTX).calls == len(seen)
    for call in sc.calls:  # one group at a time, the others held at 2 L'/L
        groups = [call[a] for a in bounds[:-1]]
        assert sum(g != 32 for g in groups) <= 1
        assert all(len(set(call[a:b])) == 1 for a, b in zip(bounds, bounds[1:]))
    assert torch.equal(det.factors, pair_scales(bounds, best))
    assert [len(r) for r in det.table] == [7] * 8 and seen[-1]["evals"] == seen[-1]["total"]
    # a flat scorer keeps every group at the held scale
    assert detect(CTX, lambda f: 0.0, groups=4).scales == [32] * 4


def test_detection_options_and_a_failing_scorer():
    sc = Synthetic(group_bounds(64, 4), [4, 1, 16, 4])
    det = detect(CTX, sc, groups=4, held=4, multipliers=(0.25, 1, 4))
    assert det.values == [1, 4, 16] and det.scales == [4, 1, 16, 4] and det.evals == 4 * 2 + 1
    nan_first = detect(CTX, lambda f: float("nan") if float(f[0]) == 1 else 0.0, groups=2, held=4,
                       multipliers=(0.25, 1))
    assert nan_first.scales == [4, 4] and nan_first.table[0][0] == -math.inf
    with pytest.raises(DPRoPEError, match="must return a number"):
        detect(CTX, lambda f: "high", groups=2)
    # lists as a recipe's re-run line writes them (--opt groups=0,16,64 --opt multipliers=0.5,1,2)
    text = detect(CTX, Synthetic([0, 16, 64], [16, 64]), groups="0,16,64", multipliers="0.5,1,2")
    assert text.bounds == [0, 16, 64] and text.values == [16, 32, 64] and text.scales == [16, 64]
    assert sweep_plan(CTX, groups="4").n_groups == 4


def test_registry_method_needs_a_scorer_and_bakes_the_group_scales():
    assert "dpe" in available_methods() and "dpe" not in available_methods(standalone=True)
    with pytest.raises(DPRoPEError, match="dpe needs a scorer.*--method dpe"):
        run_method("dpe", CTX)
    sc = Synthetic(group_bounds(64), [2, 8, 2, 8, 32, 32, 32, 128])
    r = run_method("dpe", CTX, scorer=sc)
    assert r.method == "dpe" and r.temperature == 1.0
    assert r.factors.tolist() == pair_scales(group_bounds(64), [2, 8, 2, 8, 32, 32, 32, 128]).tolist()
    assert np.allclose(r.inv_freq, CTX.inv_freq / r.factors)
    assert r.params["dpe"]["scales"] == [2, 8, 2, 8, 32, 32, 32, 128] and r.params["dpe"]["window"] == 1024
    json.dumps(r.to_dict())  # the report is JSON
    assert get_method("dpe").defaults["samples"] == 100 and get_method("dpe").defaults["needles"] == 4


def test_factors_command_says_how_to_get_a_scorer():
    res = CliRunner().invoke(main, ["factors", "--method", "dpe", "--rope-theta", "1e4", "--head-dim", "64",
                                    "--original-length", "4096", "--target-length", "8192"])
    assert res.exit_code == 2 and "dpe needs a scorer" in res.output and "Traceback" not in res.output


# ----------------------------------------------------------------------------------------------- the runtime
def _tiny_model(tiny_models, model_type="llama"):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(tiny_models[(model_type, False)]), dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def ids():
    g = torch.Generator().manual_seed(0)
    return torch.randint(3, 500, (1, 40), generator=g)


def test_runtime_is_plain_attention_when_nothing_is_grouped(tiny_models, ids):
    from convert.runtimes.dpe import disable_dpe, enable_dpe

    model = _tiny_model(tiny_models)
    n = model.get_decoder().rotary_emb.inv_freq.numel()
    with torch.no_grad():
        plain = model(ids).logits
        for scales, window in ((torch.ones(n), 4), (torch.full((n,), 8.0), 40), (torch.full((n,), 8.0), 1000)):
            enable_dpe(model, scales, window)
            assert model.config._attn_implementation == "dprope_dpe"
            got = model(ids).logits
            assert (got - plain).abs().max() < 1e-4 * plain.abs().max(), (scales[0], window)
        enable_dpe(model, torch.full((n,), 4.0), 4)
        assert (model(ids).logits - plain).abs().max() > 1e-2  # grouped positions change the result
        disable_dpe(model)
        assert model.config._attn_implementation != "dprope_dpe"
        assert torch.equal(model(ids).logits, plain)


@pytest.mark.parametrize("model_type,sparse", [("llama", False), ("llama", True), ("qwen2", False)])
def test_runtime_matches_the_per_position_oracle(tiny_models, ids, model_type, sparse):
    from reference_dpe import use_reference

    from convert.runtimes.dpe import enable_dpe

    model = _tiny_model(tiny_models, model_type)
    n = model.get_decoder().rotary_emb.inv_freq.numel()
    scales = pair_scales(group_bounds(n, 4), [1.0, 3.0, 8.0, 2.5])  # not monotone, one non-integer
    window = 6
    pos = torch.arange(ids.shape[1])[None]
    if sparse:  # a PoSE-style jump: the second half far away
        pos = torch.cat([pos[:, :20], pos[:, 20:] + 150], dim=1)
    ref = use_reference(copy.deepcopy(model), scales, window)
    with torch.no_grad():
        want = ref(ids, position_ids=pos).logits
        plain = model(ids, position_ids=pos).logits
        enable_dpe(model, scales, window)
        got = model(ids, position_ids=pos).logits
    assert (want - plain).abs().max() > 1e-2  # the case is one where grouping matters
    assert (got - want).abs().max() < 2e-4 * want.abs().max()


def test_runtime_generates_with_a_cache_as_a_full_forward_scores(tiny_models, ids):
    from convert.compat import kv_cache_kwargs, kv_cache_of
    from convert.runtimes.dpe import enable_dpe

    model = _tiny_model(tiny_models)
    n = model.get_decoder().rotary_emb.inv_freq.numel()
    enable_dpe(model, pair_scales(group_bounds(n, 2), [2.0, 6.0]), 5)
    with torch.no_grad():
        full = model(ids).logits[0, -3:]
        out = model(ids[:, :-3], use_cache=True)
        steps = []
        past = kv_cache_of(out)
        for t in range(3):
            o = model(ids[:, -3 + t : ids.shape[1] - 2 + t], use_cache=True, **kv_cache_kwargs(model, past))
            past = kv_cache_of(o)
            steps.append(o.logits[0, -1])
    assert (torch.stack(steps) - full).abs().max() < 1e-4 * full.abs().max()


def test_runtime_refuses_what_it_cannot_run(tiny_models):
    from convert.runtimes.dpe import backend_from, enable_dpe

    model = _tiny_model(tiny_models)
    with pytest.raises(ConvertError, match="rotary pairs"):
        enable_dpe(model, torch.ones(3), 8)
    with pytest.raises(ConvertError, match="> 0"):
        enable_dpe(model, torch.zeros(8), 8)
    b = backend_from("2,8", 8, 64)
    assert b.bounds == (0, 4, 8) and b.scales == (2, 8) and b.window == 8  # 1024, at most L/8
    assert backend_from("4", 8, 8192, groups=4, window=512).scales == (4, 4, 4, 4)
    for bad, msg in (("2,x", "comma-separated"), ("1,2,3,4,5,6,7,8,9", "at most one per pair"), ("", "empty")):
        with pytest.raises(ConvertError, match=msg):
            backend_from(bad, 8, 64)


# ----------------------------------------------------------------------------------------------- end to end
DETECT = ["--opt", "samples=1", "--opt", "needles=1", "--opt", "window=8", "--opt", "groups=4", "--opt",
          "metric=logprob", "--opt", "multipliers=[0.25,1,4]"]


def test_extend_with_dpe_end_to_end(tiny_models, tmp_path):
    from transformers import AutoModelForCausalLM

    src = tiny_models[("llama", False)]
    out = tmp_path / "dpe"
    res = CliRunner().invoke(main, ["extend", str(src), str(out), "--target-length", "512", "--method", "dpe",
                                    *DETECT])
    assert res.exit_code == 0, res.output
    rep = json.loads((out / "dprope_factors.json").read_text())
    d = rep["params"]["dpe"]
    assert d["bounds"] == [0, 2, 4, 6, 8] and d["held"] == 16 and d["values"] == [4, 16, 64]
    assert d["evals"] == 4 * 2 + 1 and all(s in d["values"] for s in d["scales"])
    assert all(x is not None for row in d["table"] for x in row)
    assert len({tuple(r) for r in d["table"]}) > 1  # the model's scores differ by group
    want = pair_scales(d["bounds"], d["scales"])
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["rope_scaling"]["long_factor"] == want.tolist() == rep["factors"]
    assert cfg["dprope"]["method"] == "dpe"
    # the output loads in transformers and runs with lambda = s_g past the original window
    model = AutoModelForCausalLM.from_pretrained(str(out)).eval()
    with torch.no_grad():
        model(torch.randint(3, 500, (1, 80)))
    rot = model.get_decoder().rotary_emb
    assert torch.allclose(rot.inv_freq, torch.from_numpy(dprope.base_inv_freq(1e4, 16)) / want)


def test_extend_refuses_bad_detection_options_before_loading(tiny_models, tmp_path):
    res = CliRunner().invoke(main, ["extend", str(tiny_models[("llama", False)]), str(tmp_path / "x"),
                                    "--target-length", "512", "--method", "dpe", "--opt", "metric=f1", "--opt",
                                    "samples=0"])
    assert res.exit_code == 2 and "metric must be one of" in res.output and "samples must be" in res.output
    assert not (tmp_path / "x").exists()


def test_validate_with_the_dpe_backend(tiny_models, tmp_path, monkeypatch):
    monkeypatch.setenv("DPROPE_CACHE", str(tmp_path / "cache"))  # both runs measure; none reads another test's results
    src = tiny_models[("llama", False)]
    args = ["validate", str(src), "--lengths", "128", "--tasks", "ppl", "--limit", "1", "--out"]
    plain = CliRunner().invoke(main, [*args, str(tmp_path / "plain")])
    assert plain.exit_code == 0, plain.output
    res = CliRunner().invoke(main, [*args, str(tmp_path / "dpe"), "--backend", "dpe", "--dpe-scales", "2,8",
                                    "--dpe-window", "16"])
    assert res.exit_code == 0, res.output
    v = json.loads((tmp_path / "dpe" / "validation.json").read_text())
    assert v["backend"] == {"name": "dpe", "bounds": [0, 4, 8], "scales": [2.0, 8.0], "window": 16}
    p0 = json.loads((tmp_path / "plain" / "validation.json").read_text())["rows"][0]["extended"]
    assert v["rows"][0]["extended"] != pytest.approx(p0, rel=1e-4)  # the runtime was used, not the cache
    assert "DPE runtime: window 16" in (tmp_path / "dpe" / "validation.md").read_text()
    bad = CliRunner().invoke(main, [*args, str(tmp_path / "x"), "--backend", "dpe"])
    assert bad.exit_code == 2 and "needs --dpe-scales" in bad.output
    bad = CliRunner().invoke(main, [*args, str(tmp_path / "x"), "--dpe-scales", "2"])
    assert bad.exit_code == 2 and "need --backend dpe" in bad.output


def test_validate_refuses_the_runtime_on_an_extended_checkpoint(tiny_models, tmp_path):
    from convert.stages.bake import bake, make_plan
    from convert.formats.checkpoint import open_source

    out = bake(open_source(str(tiny_models[("llama", False)])), tmp_path / "pi", make_plan("pi", 128), progress=False)
    res = CliRunner().invoke(main, ["validate", str(out), "--lengths", "128", "--tasks", "ppl", "--limit", "1",
                                    "--backend", "dpe", "--dpe-scales", "2,8"])
    assert res.exit_code == 2 and "already carries extension factors" in res.output


# ----------------------------------------------------------------------------------------------- the scorer
def _scorer(tiny_models, **cfg):
    from transformers import AutoTokenizer

    from convert.evaluate.needle import NeedleConfig, NeedleScorer

    path = tiny_models[("llama", False)]
    return NeedleScorer(_tiny_model(tiny_models), AutoTokenizer.from_pretrained(str(path)), 512, 64,
                        NeedleConfig(**cfg))


def test_needle_prompts_dense_and_sparse(tiny_models):
    dense = _scorer(tiny_models, samples=2, needles=2, metric="logprob", length=400)
    for s in dense.samples:
        assert len(s.ids) + len(s.answer) == 400 and s.positions == list(range(len(s.ids)))
        text = dense.tok.decode(s.ids)
        assert all(text.count(v) == 1 for v in s.values) and text.rstrip().endswith("provided text are")
        assert dense.tok.decode(s.answer).strip() == ", ".join(s.values) + "."
    assert dense.samples[0].values != dense.samples[1].values
    sparse = _scorer(tiny_models, samples=1, needles=2, metric="logprob", length=300, sparse=True)
    s = sparse.samples[0]
    jumps = [i for i, (a, b) in enumerate(zip(s.positions, s.positions[1:])) if b != a + 1]
    assert len(jumps) == 1 and s.positions[-1] + 1 + len(s.answer) == 512  # the question ends the target window
    first = sparse.tok.decode(s.ids[: jumps[0] + 1])
    assert all(v in first for v in s.values)  # the needles sit in the first part, ~a window away
    with pytest.raises(ConvertError, match="leaves .* for the haystack"):
        _ = _scorer(tiny_models, samples=1, needles=4, metric="accuracy", length=200).samples
    with pytest.raises(ConvertError, match="metric must be one of"):
        _scorer(tiny_models, metric="f1")


def test_scorer_modes_agree_on_the_base_and_restore_the_model(tiny_models):
    from convert.evaluate.needle import value_score

    rt = _scorer(tiny_models, samples=1, needles=1, metric="logprob", length=256, window=8)
    st = _scorer(tiny_models, samples=1, needles=1, metric="logprob", length=256, detect_with="static")
    ones, fours = torch.ones(8), torch.full((8,), 4.0)
    assert rt(ones) == pytest.approx(st(ones), abs=1e-4)  # scale 1 is the base model both ways
    assert rt(fours) != pytest.approx(st(fours), abs=1e-3)  # the window keeps the near tokens unscaled
    assert torch.equal(st.rotary.inv_freq, st.base_inv_freq)
    assert rt.model.config._attn_implementation != "dprope_dpe"
    acc = _scorer(tiny_models, samples=1, needles=1, metric="accuracy", length=256, max_new_tokens=4)
    assert 0.0 <= acc(fours) <= 1.0
    assert value_score(" 1234567,  7654321 and", ["1234567", "7654321", "1111111"]) == pytest.approx(2 / 3)
