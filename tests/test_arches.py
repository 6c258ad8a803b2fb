"""Every architecture of the table (convert/arch.py), as a tiny random model built from transformers' own config class:
extended with the default method, it loads in transformers with no warning, its rotary module rotates positions
past the window with the intended frequencies and temperature, and `dprope verify` passes."""

import json
import logging
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

import dprope
from convert.arch import ARCHES, ARCHITECTURES, lookup_arch
from convert.errors import ConvertError
from convert.formats.checkpoint import open_source
from convert.stages.bake import bake, make_plan
from convert.stages.verify import verify
from test_transformers_457 import tf457  # noqa: F401  (the fixture that installs transformers 4.57 once)
from tiny import ORIGINAL, TINY_ARCHES, make_tiny

TARGET = 4 * ORIGINAL
YARN_ARCHES = ("qwen3", "gemma3_text")  # llama.cpp's graphs for these read no factor tensor


@pytest.fixture(scope="module")
def sources(tmp_path_factory, tokenizer) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("arches")
    return {mt: make_tiny(root / mt, mt, tokenizer=tokenizer) for mt in TINY_ARCHES}


@pytest.fixture(scope="module")
def extended(sources, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("arches-ext")
    return {mt: bake(open_source(p), root / mt, make_plan(target_length=TARGET), progress=False)
            for mt, p in sources.items()}


def _cfg(d: Path) -> dict:
    return json.loads((d / "config.json").read_text())


def _written(d: Path) -> np.ndarray:
    from safetensors.numpy import load_file

    return load_file(str(d / "rope_factors.safetensors"))["long_factor"]


def test_the_table_is_the_one_list():
    assert {a.model_type for a in ARCHES} >= {"llama", "mistral", "qwen2", "qwen3", "gemma3_text", "phi3"}
    for a in ARCHES:
        assert lookup_arch(a.model_type) is a and lookup_arch(None, [a.hf_class]) is a
    with pytest.raises(ConvertError, match=r"unsupported architecture 'falcon'.*llama \(LlamaForCausalLM; GGUF llama\)"):
        lookup_arch("falcon")
    assert [a.model_type for a in ARCHES if a.hf_yarn] == list(YARN_ARCHES)


@pytest.mark.parametrize("mt", TINY_ARCHES)
def test_plain_load_has_no_warning(extended, mt):
    from transformers import AutoModelForCausalLM

    records = []

    class Catch(logging.Handler):
        def emit(self, r):
            records.append(r.getMessage())

    h = Catch(level=logging.WARNING)
    logging.getLogger("transformers").addHandler(h)
    try:
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            AutoModelForCausalLM.from_pretrained(str(extended[mt]))
    finally:
        logging.getLogger("transformers").removeHandler(h)
    assert records == [] and [str(x.message) for x in w] == []


@pytest.mark.parametrize("mt", TINY_ARCHES)
def test_rotary_module_rotates_past_the_window_as_intended(extended, mt):
    from convert.runtimes.hf import load_hf

    d = extended[mt]
    cfg = _cfg(d)
    form = cfg["dprope"]["rope_form"]
    assert form == ("yarn-fit" if mt in YARN_ARCHES else "longrope")
    rs = cfg["rope_scaling"]
    assert rs.get("rope_type", rs.get("type")) == ("yarn" if mt in YARN_ARCHES else "longrope")
    model = load_hf(d)
    theta = float(cfg["rope_theta"])
    head_dim = int(cfg["head_dim"])
    want_inv = torch.from_numpy(dprope.base_inv_freq(theta, head_dim)) / torch.tensor(_written(d))
    want_t = float(cfg["dprope"]["temperature"])
    pos = torch.tensor([[TARGET - 3, TARGET - 2, TARGET - 1]])
    x = torch.zeros(1, 3, head_dim)
    rot = model.model.rotary_emb
    kw = {"layer_type": "full_attention"} if mt == "gemma3_text" else {}
    cos, sin = rot(x, pos, **kw)
    ang = pos[0, :, None].double() * want_inv.double()[None]
    emb = torch.cat([ang, ang], -1)
    assert torch.allclose(cos[0].double(), emb.cos() * want_t, atol=2e-5)
    assert torch.allclose(sin[0].double(), emb.sin() * want_t, atol=2e-5)
    # the extension changes the rotation (not a no-op) ...
    plain = pos[0, :, None].double() * torch.from_numpy(dprope.base_inv_freq(theta, head_dim)).double()[None]
    assert not torch.allclose(cos[0].double(), torch.cat([plain, plain], -1).cos(), atol=1e-3)
    if mt == "gemma3_text":  # ... and Gemma 3's sliding layers keep their own base, unscaled
        cs, _ = rot(x, pos, layer_type="sliding_attention")
        local = pos[0, :, None].double() * torch.from_numpy(dprope.base_inv_freq(1000.0, head_dim)).double()[None]
        assert torch.allclose(cs[0].double(), torch.cat([local, local], -1).cos(), atol=2e-5)


@pytest.mark.parametrize("mt", TINY_ARCHES)
def test_verify_passes(extended, mt):
    rep = verify(extended[mt], write=False)
    assert rep.ok, [(c.name, c.detail) for c in rep.failed()]


def test_llama3_base_composes_its_factors(extended, sources):
    """new factor = llama3 factor x extension (both relative to the plain base)."""
    src = open_source(sources["llama3"])
    assert src.spec.rope_type == "llama3"
    report = json.loads((extended["llama3"] / "dprope_factors.json").read_text())
    ext = torch.tensor(report["factors"])
    assert np.allclose(_written(extended["llama3"]), src.spec.prior_factors * ext.numpy(), rtol=1e-6)
    assert float(src.spec.prior_factors.max()) == pytest.approx(2.0)  # llama3's own factor 2 on low frequencies


def test_phi3_keeps_its_short_factors_and_original_window(extended, sources):
    from convert.arch import rope_params

    src_rs, cfg = rope_params(_cfg(sources["phi3"])), _cfg(extended["phi3"])
    rs = cfg["rope_scaling"]
    assert rs["short_factor"] == pytest.approx(src_rs["short_factor"])
    assert cfg["original_max_position_embeddings"] == ORIGINAL // 2
    long = torch.tensor(src_rs["long_factor"])
    ext = torch.tensor(json.loads((extended["phi3"] / "dprope_factors.json").read_text())["factors"])
    assert rs["long_factor"] == pytest.approx((long * ext).tolist(), rel=1e-6)
    # Phi-3's own config form (what transformers 4.57 insists on): no attention_factor, so both 4.57 and 5.x apply
    # Phi-3's sqrt(1 + ln(target / original) / ln original)
    assert set(rs) == {"type", "short_factor", "long_factor"}
    assert cfg["dprope"]["temperature"] == pytest.approx((1 + np.log(TARGET / (ORIGINAL // 2)) / np.log(ORIGINAL // 2)) ** 0.5)


@pytest.mark.parametrize("mt", YARN_ARCHES)
def test_yarn_form_reports_its_fit_and_exact_keeps_the_factors(sources, tmp_path, mt, extended):
    fit = _cfg(extended[mt])["dprope"]["yarn_fit"]
    assert fit["rms_log_error"] < 0.5 and fit["fit_disturbance"] > 0 and fit["exact_disturbance"] > 0
    out = bake(open_source(sources[mt]), tmp_path / "exact", make_plan(target_length=TARGET, hf_form="exact"),
               progress=False)
    cfg = _cfg(out)
    assert cfg["rope_scaling"]["rope_type"] == "longrope" and cfg["dprope"]["gguf_form"]["rope_form"] == "yarn-fit"
    assert verify(out, write=False).ok
    with pytest.raises(ConvertError, match="--fold-temperature does not apply"):
        bake(open_source(sources[mt]), tmp_path / "fold", make_plan(target_length=TARGET), progress=False,
             fold_temperature=True)
    assert not (tmp_path / "fold").exists()


CHILD_457 = r"""
import json, sys, torch, transformers
from transformers import AutoModelForCausalLM
assert transformers.__version__.startswith("4.57"), transformers.__version__
pos = int(sys.argv[1])
out = {}
for d in sys.argv[2:]:  # every directory in one interpreter: importing 4.57 costs more than a tiny model's forward
    model = AutoModelForCausalLM.from_pretrained(d).eval()
    rot = model.model.rotary_emb
    with torch.no_grad():
        model(torch.zeros(1, pos + 1, dtype=torch.long))
        cos, sin = rot(torch.zeros(1, 1, 4), torch.tensor([[pos]]))
    out[d] = {"cos": cos[0, 0].tolist(), "sin": sin[0, 0].tolist()}
print(json.dumps(out))
"""
ARCHES_457 = ["llama3", "qwen3", "gemma3_text", "phi3"]


@pytest.fixture(scope="module")
def rotations_457(extended, tf457) -> dict[str, dict]:
    """{arch: the cos/sin transformers 4.57 computes at the last target position for its extended directory}."""
    env = {**os.environ, "PYTHONPATH": str(tf457)}
    dirs = [str(extended[mt]) for mt in ARCHES_457]
    p = subprocess.run([sys.executable, "-c", CHILD_457, str(TARGET - 1), *dirs], capture_output=True, text=True,
                       env=env)
    assert p.returncode == 0, p.stderr[-2000:]
    got = json.loads(p.stdout.strip().splitlines()[-1])
    return {mt: got[d] for mt, d in zip(ARCHES_457, dirs)}


@pytest.mark.parametrize("mt", ARCHES_457)
def test_transformers_457_rotates_the_same(extended, mt, rotations_457):
    d = extended[mt]
    cfg = _cfg(d)
    pos = TARGET - 1
    got = rotations_457[mt]
    inv = torch.from_numpy(dprope.base_inv_freq(float(cfg["rope_theta"]), int(cfg["head_dim"]))).double() / torch.tensor(_written(d))
    ang = torch.cat([pos * inv, pos * inv])
    t = float(cfg["dprope"]["temperature"])
    assert np.allclose(got["cos"], (ang.cos() * t).numpy(), atol=2e-5)
    assert np.allclose(got["sin"], (ang.sin() * t).numpy(), atol=2e-5)


def test_every_reader_uses_the_table():
    """DPE's runtime and the training launch config read the table (no list of their own)."""
    from convert.stages.train import accelerate_config

    assert ARCHITECTURES["qwen3"].dpe and not ARCHITECTURES["gemma3_text"].dpe
    cfg = accelerate_config(2, layer_cls=ARCHITECTURES["gemma3_text"].decoder_layer)
    assert "Gemma3DecoderLayer" in json.dumps(cfg)


@pytest.mark.parametrize("mt", ["qwen3", "gemma3_text", "phi3"])
def test_trains_and_validates_like_llama(extended, mt, tmp_path):
    """Continued training keeps the config (and so the factors) byte for byte and learns; validation scores the
    extended model against its base in transformers."""
    from convert.stages.train import TrainArgs, train
    from convert.stages.validate import validate

    ck = extended[mt]
    data = tmp_path / "repeat.txt"
    data.write_text("The quick brown fox jumps over the lazy dog. " * 300)
    args = TrainArgs(str(data), seq_len=128, steps=2, global_batch=2, micro_batch=1, lr=3e-3, save_steps=2,
                     eval_fraction=0.25, eval_steps=2)
    s = train(ck, tmp_path / "trained", args, force_cpu=True, progress=False)
    assert s["steps"] == 2 and s["eval_loss_after"] < s["eval_loss_before"]
    assert (tmp_path / "trained" / "config.json").read_bytes() == (ck / "config.json").read_bytes()
    res = validate(tmp_path / "trained", None, lengths=[2 * ORIGINAL], tasks=["ppl"], limit=1,
                   out_dir=tmp_path / "val", progress=False)
    assert (tmp_path / "val" / "validation.md").exists() and res.rows
