"""GGUF export proven in a real llama.cpp runtime (llama-cpp-python), against transformers on the same checkpoint.

Tiny random checkpoints with an original window of 64, extended 4x to 256; logits are compared at 200 tokens, past
the original window.  Tolerances: f32 weights with an F32 KV cache differ from transformers only by float32
summation order (observed ~2e-5 on logits of magnitude ~7), so 1e-3 is a 50x margin and still 10^4 below what
dropping the factors does (~10).  Quantised types are compared by the mean KL of next-token distributions.
"""

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from convert.stages.bake import bake, make_plan
from convert.cli import main
from convert.errors import ConvertError
from convert.formats.gguf_export import export_gguf, reemit_gguf
from convert.arch import gguf_fields
from convert.runtimes.base import max_abs_diff, mean_kl
from convert.runtimes.hf import hf_logits
from convert.runtimes.llamacpp import llama_cpp_logits, llama_cpp_tokenize
from convert.formats.checkpoint import open_source
from tiny import ORIGINAL, make_tiny, tiny_tokenizer

pytestmark = pytest.mark.runtime
TARGET = 4 * ORIGINAL
N_TOKENS = 200
F32_TOL = 1e-3
KL_TOL = {"f16": 1e-4, "bf16": 2e-3, "q8_0": 1e-2}
MIXED = ("Hello world! 12345 numbers, 3.14159 üñíçødé and    spaces\n\n\ttabs. def f(x): return x**2 # code "
         "你好 I'm we'll <s> don't")


def _ids(n=N_TOKENS, vocab=500, seed=0):
    return np.random.default_rng(seed).integers(3, vocab, n).tolist()


@pytest.fixture(scope="module")
def extended(tiny_models, tmp_path_factory):
    root = tmp_path_factory.mktemp("ext")
    return {mt: bake(open_source(tiny_models[(mt, False)]), root / mt, make_plan(target_length=TARGET), progress=False)
            for mt in ("llama", "mistral", "qwen2")}


@pytest.mark.parametrize("family", ["gpt-2", "smollm", "llama-bpe", "qwen2", "spm"])
def test_token_ids_match_hf_for_each_tokenizer_family(tmp_path, family):
    from transformers import AutoTokenizer

    d = make_tiny(tmp_path / family, "llama", tokenizer=tiny_tokenizer(family))
    gg = export_gguf(d, tmp_path / "m.gguf", "f32", progress=False)
    hf = AutoTokenizer.from_pretrained(str(d))(MIXED, add_special_tokens=False).input_ids
    assert llama_cpp_tokenize(gg, MIXED) == hf
    assert len(hf) > 40


@pytest.mark.parametrize("model_type", ["llama", "mistral", "qwen2"])
def test_f32_logits_match_transformers_past_the_window(extended, tmp_path, model_type):
    ckpt = extended[model_type]
    ids = _ids()
    ref = hf_logits(ckpt, ids)
    gg = export_gguf(ckpt, tmp_path / "f32.gguf", "f32", progress=False)
    got, n_ctx = llama_cpp_logits(gg, ids, TARGET)
    assert n_ctx == TARGET  # llama.cpp allocates the target context, no silent cap
    assert max_abs_diff(ref, got) < F32_TOL
    # negative control: the same file without the factor tensor is a different model
    nof = export_gguf(ckpt, tmp_path / "nof.gguf", "f32", progress=False, drop_factors=True)
    bad, _ = llama_cpp_logits(nof, ids, TARGET)
    assert max_abs_diff(ref, bad) > 100 * F32_TOL and mean_kl(ref, bad) > 0.1
    meta, reader = gguf_fields(gg)
    assert meta["llama.context_length"] == TARGET and meta["llama.rope.scaling.original_context_length"] == ORIGINAL
    assert "llama.rope.scaling.factor" not in meta
    rf = next(t for t in reader.tensors if t.name == "rope_freqs.weight")
    assert rf.tensor_type.name == "F32" and list(rf.shape) == [8]
    factors = json.loads((ckpt / "dprope_factors.json").read_text())["factors"]
    assert np.array_equal(rf.data, np.asarray(factors, dtype=np.float32))


@pytest.mark.parametrize("outtype", ["f16", "bf16", "q8_0"])
def test_other_outtypes_run_close_to_transformers(extended, tmp_path, outtype):
    ckpt = extended["qwen2"]
    ids = _ids()
    ref = hf_logits(ckpt, ids)
    gg = export_gguf(ckpt, tmp_path / f"{outtype}.gguf", outtype, progress=False)
    got, _ = llama_cpp_logits(gg, ids, TARGET)
    assert mean_kl(ref, got) < KL_TOL[outtype]
    types = {t.name: t.tensor_type.name for t in gguf_fields(gg)[1].tensors}
    assert types["blk.0.attn_q.weight"] == outtype.upper() and types["blk.0.attn_q.bias"] == "F32"
    assert types["rope_freqs.weight"] == "F32"


def test_longrope_layout_short_and_long_contexts(tokenizer, tmp_path):
    """Original window 256 -> 1024 with short factors = the base RoPE: llama.cpp picks short for n_ctx <= 256 and
    long above, like transformers picks by sequence length."""
    base = make_tiny(tmp_path / "base", "llama", tokenizer=tokenizer, max_pos=256)
    ckpt = bake(open_source(base), tmp_path / "ext", make_plan("dprope-paper", 1024, short_factor="original"),
                progress=False)
    gg = export_gguf(ckpt, tmp_path / "lr.gguf", "f32", "longrope", progress=False)
    meta, reader = gguf_fields(gg)
    temp = json.loads((ckpt / "config.json").read_text())["rope_scaling"]["attention_factor"]
    assert meta["llama.rope.scaling.type"] == "longrope"
    assert meta["llama.rope.scaling.attn_factor"] == pytest.approx(temp)
    assert {"rope_factors_long.weight", "rope_factors_short.weight"} <= {t.name for t in reader.tensors}
    short_ids, long_ids = _ids(100, seed=1), _ids(300, seed=2)
    ref_short, ref_long = hf_logits(ckpt, short_ids), hf_logits(ckpt, long_ids)
    got_short, n = llama_cpp_logits(gg, short_ids, 256)
    assert n == 256 and max_abs_diff(ref_short, got_short) < F32_TOL
    got_long, n = llama_cpp_logits(gg, long_ids, 1024)
    assert n == 1024 and max_abs_diff(ref_long, got_long) < F32_TOL
    # the two factor sets really differ on this model: the short run is not the long one
    assert max_abs_diff(hf_logits(base, short_ids), ref_short) < 1e-4
    assert max_abs_diff(hf_logits(base, long_ids), ref_long) > 0.1


def test_gguf_to_gguf_keeps_quantised_tensors_byte_for_byte(tiny_models, tmp_path):
    base_gguf = export_gguf(tiny_models[("llama", False)], tmp_path / "base-q8_0.gguf", "q8_0", progress=False)
    res = CliRunner().invoke(main, ["extend", str(base_gguf), str(tmp_path / "ext"), "--target-length", str(TARGET)])
    assert res.exit_code == 0, res.output
    res = CliRunner().invoke(main, ["export-gguf", str(tmp_path / "ext"), str(tmp_path / "ext.gguf"), "--base-gguf",
                                    str(base_gguf)])
    assert res.exit_code == 0, res.output
    assert "rope_freqs.weight" in res.output
    _, rin = gguf_fields(base_gguf)
    meta, rout = gguf_fields(tmp_path / "ext.gguf")
    out_t = {t.name: t for t in rout.tensors}
    for t in rin.tensors:
        o = out_t[t.name]
        assert o.tensor_type == t.tensor_type and bytes(o.data.tobytes()) == bytes(t.data.tobytes()), t.name
    assert set(out_t) == {t.name for t in rin.tensors} | {"rope_freqs.weight"}
    assert meta["llama.context_length"] == TARGET and meta["tokenizer.ggml.pre"] == "gpt-2"
    ids = _ids()
    ref = hf_logits(tmp_path / "ext", ids)  # the dequantised weights: the same numbers llama.cpp multiplies
    got, n = llama_cpp_logits(tmp_path / "ext.gguf", ids, TARGET)
    assert n == TARGET and mean_kl(ref, got) < KL_TOL["q8_0"]


def test_bad_exports_are_refused(extended, tiny_models, tmp_path):
    with pytest.raises(ConvertError, match="already exists"):
        p = tmp_path / "x.gguf"
        p.write_bytes(b"")
        export_gguf(extended["llama"], p, "f32", progress=False)
    with pytest.raises(ConvertError, match="carries no factors"):
        base_gguf = export_gguf(tiny_models[("llama", False)], tmp_path / "b.gguf", "f32", progress=False)
        reemit_gguf(base_gguf, tiny_models[("llama", False)], tmp_path / "y.gguf")
    assert not list(tmp_path.glob(".*partial*"))


def test_export_stage_writes_manifest_and_modelfiles(extended, tmp_path):
    import hashlib

    out = tmp_path / "exp"
    res = CliRunner().invoke(main, ["export", str(extended["llama"]), str(out), "--gguf", "f16,q8_0",
                                    "--name", "tiny"])
    assert res.exit_code == 0, res.output
    m = json.loads((out / "manifest.json").read_text())
    assert [g["file"] for g in m["gguf"]] == ["tiny-f16.gguf", "tiny-q8_0.gguf"]
    for g in m["gguf"]:
        assert hashlib.sha256((out / g["file"]).read_bytes()).hexdigest() == g["sha256"]
        assert (out / g["modelfile"]).read_text() == f"FROM ./{g['file']}\nPARAMETER num_ctx {TARGET}\n"
    files = m["checkpoint"]["files"]
    assert files["model.safetensors"]["sha256"] == hashlib.sha256(
        (extended["llama"] / "model.safetensors").read_bytes()).hexdigest()
    assert "config.json" in files and "rope_factors.safetensors" in files


def test_rows_are_read_exactly_for_every_weight_dtype(tmp_path):
    """The export reads tensors with plain file reads; bf16, f16 and f32 rows equal safetensors' own loading."""
    import torch
    from safetensors.torch import save_file

    from convert.formats.gguf_export import _read_rows, _Tensor
    from convert.formats.checkpoint import safetensors_header

    g = torch.Generator().manual_seed(0)
    tensors = {f"w_{d}": torch.randn(37, 5, 3, generator=g).to(getattr(torch, d))
               for d in ("bfloat16", "float16", "float32")}
    f = tmp_path / "x.safetensors"
    save_file(tensors, str(f))
    header = safetensors_header(f)
    start = 8 + int.from_bytes(f.read_bytes()[:8], "little")
    with open(f, "rb") as fh:
        for name, t in tensors.items():
            info = header[name]
            spec = _Tensor(name, name, tuple(info["shape"]), f, None, 0, info["dtype"],
                           start + info["data_offsets"][0])
            got = _read_rows(fh, spec, 4, 29)
            assert got.dtype == np.float32 and np.array_equal(got, t[4:29].float().numpy())


def test_lean_header_reader_agrees_with_gguf_py_and_refuses_bad_files(extended, tmp_path):
    import gguf

    from convert.io.gguf_meta import read_gguf

    gg = export_gguf(extended["qwen2"], tmp_path / "q.gguf", "q8_0", progress=False)
    info, ref = read_gguf(gg), gguf.GGUFReader(str(gg))
    for key, field in ref.fields.items():
        if key.startswith("GGUF."):
            continue
        if key.rsplit(".", 1)[-1] in ("tokens", "merges", "token_type", "scores"):
            assert info.meta[f"{key}#len"] == len(field.data) and key not in info.meta
        else:
            assert info.meta[key] == field.contents(), key
    assert [t.name for t in info.tensors] == [t.name for t in ref.tensors]
    for a, b in zip(info.tensors, ref.tensors):
        assert (a.tensor_type, a.shape, a.offset, a.n_bytes) == (b.tensor_type, tuple(int(x) for x in b.shape),
                                                                 b.data_offset, int(b.n_bytes))
        assert a.data.tobytes() == b.data.tobytes(), a.name
    raw = gg.read_bytes()
    (tmp_path / "head.gguf").write_bytes(raw[:2000])  # cut inside the header
    (tmp_path / "body.gguf").write_bytes(raw[: len(raw) - 100])  # cut inside the last tensor
    (tmp_path / "text.gguf").write_bytes(b"not a model at all, just text" * 10)
    for name, words in (("head", "truncated"), ("body", "truncated"), ("text", "not a GGUF")):
        with pytest.raises(ConvertError, match=words):
            read_gguf(tmp_path / f"{name}.gguf")


def _with_config(src: Path, dst: Path, **rope_scaling) -> Path:
    import shutil

    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    cfg["rope_scaling"].update(rope_scaling)
    (dst / "config.json").write_text(json.dumps(cfg, indent=2))
    return dst


def test_temperature_travels_to_llama_cpp_with_rope_freqs(tiny_models, tmp_path):
    """A method's attention temperature: attention_factor in config.json, and
    rope.scaling.attn_factor next to rope_freqs.weight in the GGUF, which llama.cpp applies (parity past the
    window); the same GGUF without the key runs a different model (negative control)."""
    ckpt = bake(open_source(tiny_models[("llama", False)]), tmp_path / "ext",
                make_plan("pi", TARGET, options={"temperature": 1.3}), progress=False)
    rs = json.loads((ckpt / "config.json").read_text())["rope_scaling"]
    assert rs["attention_factor"] == pytest.approx(1.3)
    ids = _ids()
    ref = hf_logits(ckpt, ids)
    gg = export_gguf(ckpt, tmp_path / "t.gguf", "f32", progress=False)
    meta, reader = gguf_fields(gg)
    assert meta["llama.rope.scaling.attn_factor"] == pytest.approx(1.3)
    assert "llama.rope.scaling.type" not in meta and "rope_freqs.weight" in {t.name for t in reader.tensors}
    got, _ = llama_cpp_logits(gg, ids, TARGET)
    assert max_abs_diff(ref, got) < F32_TOL
    # negative control: the same factors, no temperature key
    plain = _with_config(ckpt, tmp_path / "no-t", attention_factor=1.0)
    gg0 = export_gguf(plain, tmp_path / "no-t.gguf", "f32", progress=False)
    assert "llama.rope.scaling.attn_factor" not in gguf_fields(gg0)[0]
    bad, _ = llama_cpp_logits(gg0, ids, TARGET)
    assert max_abs_diff(ref, bad) > 100 * F32_TOL


def test_folded_temperature_runs_the_same_model(tiny_models, tmp_path):
    """--fold-temperature: q/k weights times t, temperature 1 in the config; transformers and llama.cpp (no
    temperature key) give the logits of the unfolded checkpoint."""
    src = open_source(tiny_models[("qwen2", False)])  # q/k biases are folded too
    plan = make_plan("yarn", TARGET)
    ckpt = bake(src, tmp_path / "ext", plan, progress=False)
    folded = bake(src, tmp_path / "fold", plan, progress=False, fold_temperature=True)
    cfg = json.loads((folded / "config.json").read_text())
    t = 0.1 * np.log(4) + 1
    assert cfg["rope_scaling"]["attention_factor"] == 1.0 and cfg["dprope"]["temperature_folded"] == pytest.approx(t)
    ids = _ids()
    ref = hf_logits(ckpt, ids)
    assert max_abs_diff(ref, hf_logits(folded, ids)) < 1e-4
    from safetensors.numpy import load_file

    a = load_file(str(next(ckpt.glob("model*.safetensors"))))
    b = load_file(str(next(folded.glob("model*.safetensors"))))
    qk = [k for k in a if ".q_proj." in k or ".k_proj." in k]
    assert len(qk) == 8 and all(np.allclose(b[k], a[k] * t, rtol=1e-6) for k in qk)
    assert all(np.array_equal(a[k], b[k]) for k in a if k not in qk)
    gg = export_gguf(folded, tmp_path / "fold.gguf", "f32", progress=False)
    assert "qwen2.rope.scaling.attn_factor" not in gguf_fields(gg)[0]
    assert "llama.rope.scaling.attn_factor" not in gguf_fields(gg)[0]
    got, _ = llama_cpp_logits(gg, ids, TARGET)
    assert max_abs_diff(ref, got) < F32_TOL
    # the source's own files are never patched
    assert np.array_equal(load_file(str(next(src.path.glob("model*.safetensors"))))[qk[0]], a[qk[0]])
