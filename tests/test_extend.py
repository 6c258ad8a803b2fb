"""Source -> factors -> bake on tiny random Llama / Mistral / Qwen2 checkpoints, loaded back by transformers."""

import hashlib
import json
import struct
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

import dprope
from convert.stages.bake import bake, make_plan
from convert.cli import main
from convert.errors import ConvertError
from convert.formats.checkpoint import open_source
from tiny import ORIGINAL, edit_config

TARGET = 4 * ORIGINAL


def _sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def _extend(src_dir, out, **plan_kw):
    plan = make_plan(target_length=plan_kw.pop("target_length", TARGET), **plan_kw)
    return bake(open_source(src_dir), out, plan, progress=False)


def _no_leftovers(parent: Path, name: str):
    assert not (parent / name).exists()
    assert not [p for p in parent.iterdir() if p.name.startswith(f".{name}.")]


@pytest.mark.parametrize("model_type", ["llama", "mistral", "qwen2"])
@pytest.mark.parametrize("sharded", [False, True])
def test_output_loads_in_transformers_with_the_factors(tiny_models, tmp_path, model_type, sharded):
    from transformers import AutoModelForCausalLM

    src = tiny_models[(model_type, sharded)]
    out = _extend(src, tmp_path / "out")
    r = json.loads((out / "dprope_factors.json").read_text())
    factors = torch.tensor(r["factors"])
    assert len(set(factors.tolist())) > 2 and float(factors.min()) >= 1  # per-pair factors, not one scale

    # weights byte-identical, index and tokenizer carried over
    for f in sorted(src.glob("*.safetensors")):
        assert _sha(f) == _sha(out / f.name)
    if sharded:
        assert (out / "model.safetensors.index.json").read_bytes() == (src / "model.safetensors.index.json").read_bytes()
    assert (out / "tokenizer.json").read_bytes() == (src / "tokenizer.json").read_bytes()

    cfg = json.loads((out / "config.json").read_text())
    assert cfg["max_position_embeddings"] == TARGET and cfg["original_max_position_embeddings"] == ORIGINAL
    assert cfg["rope_scaling"]["rope_type"] == "longrope" and "rope_parameters" not in cfg
    # the default method's temperature as attention_factor, and no key transformers warns about
    t = r["temperature"]
    assert t > 1 and cfg["rope_scaling"]["attention_factor"] == pytest.approx(t)
    assert not {"short_mscale", "long_mscale"} & set(cfg["rope_scaling"])
    assert cfg["rope_scaling"]["type"] == "longrope" and cfg["dprope"]["method"] == r["method"]

    model = AutoModelForCausalLM.from_pretrained(str(out)).eval()
    base = AutoModelForCausalLM.from_pretrained(str(src)).eval()
    base_inv = torch.from_numpy(dprope.base_inv_freq(10000.0, 16))
    ids = torch.randint(0, model.config.vocab_size, (1, 3 * ORIGINAL))  # past the original window
    with torch.no_grad():
        got = model(ids).logits
        # after a long forward pass the rotary module holds the long factors
        assert torch.allclose(model.model.rotary_emb.inv_freq, base_inv / factors, rtol=1e-6, atol=0)
        # an independent reference: the base model with the factors patched into its rotary module by hand
        rot = base.model.rotary_emb
        rot.inv_freq = base_inv / factors
        rot.original_inv_freq = rot.inv_freq
        rot.attention_scaling = t
        want = base(ids).logits
        base_plain = AutoModelForCausalLM.from_pretrained(str(src)).eval()
        plain = base_plain(ids).logits
    # fractional factors: transformers computes 1 / (factor * b^(2i/d)), the reference b^(-2i/d) / factor (last-bit
    # differences in inv_freq), so the logits agree to ~1e-5 relative, not bit for bit
    assert torch.allclose(got, want, atol=2e-4, rtol=1e-4)
    assert (got - plain).abs().max() > 1e-2  # the factors really change the model past the window


def test_methods_share_the_path(tiny_models, tmp_path):
    src = tiny_models[("llama", False)]
    for method in ("pi", "ntk", "yarn", "llama3"):
        out = _extend(src, tmp_path / method, method=method)
        cfg = json.loads((out / "config.json").read_text())
        long = torch.tensor(cfg["rope_scaling"]["long_factor"])
        ctx = dprope.RopeContext(dprope.base_inv_freq(10000.0, 16), 10000.0, ORIGINAL, TARGET)
        name = {"pi": "interpolation"}.get(method, method)
        assert torch.allclose(long, torch.from_numpy(dprope.get_candidate(name).factors(ctx)))
        if method == "yarn":
            assert cfg["rope_scaling"]["attention_factor"] == pytest.approx(0.1 * torch.log(torch.tensor(4.0)) + 1)


def test_short_factor_original(tiny_models, tmp_path):
    out = _extend(tiny_models[("qwen2", False)], tmp_path / "o", short_factor="original")
    sc = json.loads((out / "config.json").read_text())["rope_scaling"]
    assert sc["short_factor"] == [1.0] * 8 and sc["long_factor"] != sc["short_factor"]


def test_already_scaled_base_keeps_its_scaling(tiny_copy, tmp_path):
    """A llama3-scaled base: the long factors are its own factors times DPRoPE's, relative to the plain base."""
    from transformers import AutoModelForCausalLM

    src = tiny_copy("llama")
    edit_config(src, rope_parameters={"rope_type": "llama3", "rope_theta": 10000.0, "factor": 4.0,
                                      "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                      "original_max_position_embeddings": 16},
                max_position_embeddings=64)
    spec = open_source(src).spec
    base_model = AutoModelForCausalLM.from_pretrained(str(src))
    assert torch.allclose(torch.from_numpy(spec.inv_freq), base_model.model.rotary_emb.inv_freq, rtol=1e-6)
    out = _extend(src, tmp_path / "o")
    model = AutoModelForCausalLM.from_pretrained(str(out))
    factors = torch.tensor(json.loads((out / "dprope_factors.json").read_text())["factors"])
    with torch.no_grad():
        model(torch.zeros(1, 100, dtype=torch.long))
    assert torch.allclose(model.model.rotary_emb.inv_freq, torch.from_numpy(spec.inv_freq) / factors, rtol=1e-5)


def test_cli_extend_and_inspect(tiny_models, tmp_path):
    out = tmp_path / "cli-out"
    runner = CliRunner()
    res = runner.invoke(main, ["extend", str(tiny_models[("mistral", True)]), str(out), "--target-length", "256",
                               "--plot"])
    assert res.exit_code == 0, res.output
    assert (out / "dprope_factors.png").stat().st_size > 10_000
    assert (out / "README.md").read_text().count("extended to 256 tokens") == 1
    assert "dprope extend" in (out / "dprope_recipe.yaml").read_text()
    res = runner.invoke(main, ["inspect", str(out)])
    assert res.exit_code == 0
    assert "max_position_embeddings: 256" in res.output and "long_factor: 8 values" in res.output
    # existing destination refused without --force, replaced with it
    res = runner.invoke(main, ["extend", str(tiny_models[("mistral", True)]), str(out), "--target-length", "128"])
    assert res.exit_code == 2 and "already exists" in res.output and "--force" in res.output
    res = runner.invoke(main, ["extend", str(tiny_models[("mistral", True)]), str(out), "--target-length", "128",
                               "--force"])
    assert res.exit_code == 0
    assert json.loads((out / "config.json").read_text())["max_position_embeddings"] == 128
    # neither the partial output nor the replaced one is left beside it
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def _truncate(p: Path, keep: int):
    data = p.read_bytes()
    p.write_bytes(data[:keep])


@pytest.mark.parametrize(
    "damage,msg",
    [
        (lambda d: (d / "config.json").unlink(), "config.json"),
        (lambda d: sorted(d.glob("model-*.safetensors"))[1].unlink(), "missing"),
        (lambda d: _truncate(sorted(d.glob("model-*.safetensors"))[0], 5000), "truncated"),
        (lambda d: _truncate(sorted(d.glob("model-*.safetensors"))[0], 4), "truncated"),
        (lambda d: _add_index_entry(d, "model.layers.9.mlp.up_proj.weight"), "not found in their shard"),
        (lambda d: edit_config(d, model_type="gpt2", architectures=["GPT2LMHeadModel"]), "unsupported architecture"),
        (lambda d: edit_config(d, partial_rotary_factor=0.5), "partial rotary"),
        (lambda d: [f.unlink() for f in d.glob("*.safetensors*")], "no weights"),
        (lambda d: (d / "config.json").write_text("{not json"), "not valid JSON"),
    ],
)
def test_bad_inputs_one_clear_error_no_output(tiny_copy, tmp_path, damage, msg):
    src = tiny_copy("llama", sharded=True)
    damage(src)
    res = CliRunner().invoke(main, ["extend", str(src), str(tmp_path / "out"), "--target-length", "256"])
    assert res.exit_code == 2, res.output
    assert msg in res.output and res.output.count("error:") == 1 and "Traceback" not in res.output
    _no_leftovers(tmp_path, "out")


def _add_index_entry(d: Path, name: str):
    idx = d / "model.safetensors.index.json"
    data = json.loads(idx.read_text())
    data["weight_map"][name] = sorted(set(data["weight_map"].values()))[0]
    idx.write_text(json.dumps(data))


@pytest.mark.parametrize("target", [ORIGINAL, ORIGINAL // 2])
def test_target_not_longer_is_refused(tiny_models, tmp_path, target):
    res = CliRunner().invoke(main, ["extend", str(tiny_models[("llama", False)]), str(tmp_path / "out"),
                                    "--target-length", str(target)])
    assert res.exit_code == 2 and "not longer than" in res.output
    _no_leftovers(tmp_path, "out")


def test_interrupted_bake_leaves_nothing_that_looks_finished(tiny_models, tmp_path, monkeypatch):
    calls = []

    def boom(out, *a, **k):
        calls.append(sorted(p.name for p in Path(out).iterdir()))
        raise KeyboardInterrupt

    # the card is the last small file bake writes: the config and factors are in the partial folder by then
    monkeypatch.setattr("convert.card.write_card", boom)  # raising=True: the patched name must exist
    with pytest.raises(KeyboardInterrupt):
        _extend(tiny_models[("llama", True)], tmp_path / "out")
    assert len(calls) == 1 and {"config.json", "rope_factors.safetensors"} <= set(calls[0])
    _no_leftovers(tmp_path, "out")


def test_pickle_weights_need_a_flag(tiny_copy, tmp_path):
    from safetensors.torch import load_file

    src = tiny_copy("llama")
    sd = load_file(str(src / "model.safetensors"))
    torch.save(sd, src / "pytorch_model.bin")
    (src / "model.safetensors").unlink()
    res = CliRunner().invoke(main, ["extend", str(src), str(tmp_path / "out"), "--target-length", "256"])
    assert res.exit_code == 2 and "--allow-pickle" in res.output
    _no_leftovers(tmp_path, "out")
    res = CliRunner().invoke(main, ["extend", str(src), str(tmp_path / "out"), "--target-length", "256",
                                    "--allow-pickle"])
    assert res.exit_code == 0, res.output
    back = load_file(str(tmp_path / "out" / "model.safetensors"))
    assert back.keys() == sd.keys() and all(torch.equal(back[k], sd[k]) for k in sd)


def test_hub_id_not_cached_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(ConvertError, match="local Hugging Face cache"):
        open_source("someorg/somemodel")


def test_safetensors_header_lies_about_size(tiny_copy, tmp_path):
    src = tiny_copy("qwen2")
    f = src / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[:8] = struct.pack("<Q", 10**9)
    f.write_bytes(bytes(data))
    with pytest.raises(ConvertError, match="truncated or not safetensors"):
        open_source(src)


def test_hub_id_in_the_local_cache_is_used(tiny_models, tmp_path, monkeypatch):
    """A hub id resolves offline when its snapshot is in the local Hugging Face cache."""
    import shutil

    hf_home = tmp_path / "hf"
    repo = hf_home / "hub" / "models--someorg--tiny"
    commit = "0123456789abcdef0123456789abcdef01234567"
    shutil.copytree(tiny_models[("llama", False)], repo / "snapshots" / commit)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setenv("HF_HOME", str(hf_home))
    monkeypatch.setenv("HF_HUB_CACHE", str(hf_home / "hub"))
    src = open_source("someorg/tiny")
    assert src.kind == "hub" and src.path == repo / "snapshots" / commit
    out = bake(src, tmp_path / "out", make_plan(target_length=TARGET), progress=False)
    assert json.loads((out / "config.json").read_text())["max_position_embeddings"] == TARGET
    assert "someorg/tiny" in (out / "README.md").read_text()


def test_every_registered_method_bakes_and_loads(tiny_models, tmp_path):
    """Each method through bake: config factors = the method's, temperature under every key, transformers reload."""
    from transformers import AutoConfig

    from dprope.methods import available_methods

    src = tiny_models[("qwen2", False)]
    for name in available_methods(standalone=True):  # the search needs a fitness
        out = _extend(src, tmp_path / name, method=name)
        rep = json.loads((out / "dprope_factors.json").read_text())
        cfg = json.loads((out / "config.json").read_text())
        assert rep["method"] == name and cfg["dprope"]["method"] == name
        assert cfg["rope_scaling"]["long_factor"] == pytest.approx(rep["factors"])
        assert cfg["rope_scaling"]["attention_factor"] == pytest.approx(rep["temperature"])
        assert AutoConfig.from_pretrained(str(out)).max_position_embeddings == TARGET


def test_bake_is_byte_reproducible(tiny_models, tmp_path):
    """The same source and plan give the same bytes in every file (content digests key caches and stages)."""
    import subprocess
    import sys

    src = tiny_models[("llama", False)]
    code = ("import sys; from convert.stages.bake import bake, make_plan; from convert.formats.checkpoint import open_source; "
            "bake(open_source(sys.argv[1]), sys.argv[2], make_plan(target_length=256), progress=False)")
    for name in ("a", "b"):  # separate processes: hash-map ordering differs between them
        subprocess.run([sys.executable, "-c", code, str(src), str(tmp_path / name)], check=True,
                       cwd=Path(__file__).resolve().parents[1])
    for f in sorted((tmp_path / "a").iterdir()):
        if f.name != "README.md":  # the card records versions only; it is compared as text below
            assert _sha(f) == _sha(tmp_path / "b" / f.name), f.name
    from safetensors.torch import load_file

    t = load_file(str(tmp_path / "a" / "rope_factors.safetensors"))
    assert set(t) == {"long_factor", "short_factor", "inv_freq", "base_inv_freq"} and t["long_factor"].shape == (8,)
