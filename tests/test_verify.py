"""`dprope verify` passes on correct outputs and fails, naming the check, on each known silent failure."""

import json
import shutil
from pathlib import Path

import gguf
import numpy as np
import pytest
from click.testing import CliRunner

from convert.stages.bake import bake, make_plan
from convert.cli import main
from convert.stages.export import export_outputs
from convert.formats.checkpoint import open_source
from tiny import ORIGINAL, edit_config

pytestmark = pytest.mark.runtime
TARGET = 4 * ORIGINAL


def rewrite_gguf(src: Path, dst: Path, overrides: dict | None = None, factor_scale: float | None = None,
                 drop: tuple = ()) -> Path:
    """Copy a GGUF changing metadata values or the factor tensor: the damage a broken converter does."""
    r = gguf.GGUFReader(str(src))
    w = gguf.GGUFWriter(str(dst), r.fields["general.architecture"].contents())
    for key, f in r.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture" or key in drop:
            continue
        val = (overrides or {}).get(key, f.contents())
        w.add_key_value(key, val, f.types[0], sub_type=f.types[-1] if f.types[0] == gguf.GGUFValueType.ARRAY else None)
    for t in r.tensors:
        if t.name in drop:
            continue
        data = np.array(t.data)
        if factor_scale and t.name.startswith("rope_"):
            data = data * np.float32(factor_scale)
        w.add_tensor(t.name, data, raw_shape=data.shape if t.tensor_type.name in ("F32", "F16") else None,
                     raw_dtype=t.tensor_type)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return dst


@pytest.fixture(scope="module")
def good(tiny_models, tmp_path_factory):
    root = tmp_path_factory.mktemp("verify")
    ck = bake(open_source(tiny_models[("llama", False)]), root / "hf", make_plan(target_length=TARGET), progress=False)
    export_outputs(ck, root / "export", ("f32", "q8_0"), progress=False)
    return root


def _run(*args):
    return CliRunner().invoke(main, ["verify", *map(str, args)])


def test_verify_passes_on_a_correct_export(good):
    res = _run(good)
    assert res.exit_code == 0, res.output
    data = json.loads((good / "hf" / "verify.json").read_text())
    assert data["ok"] is True
    names = {(c["name"], c["target"].split(" ")[0]) for c in data["checks"]}
    for f in ("hf-f32.gguf", "hf-q8_0.gguf"):
        for check in ("gguf-metadata", "gguf-factors", "gguf-context", "parity"):
            assert (check, f) in names
    assert ("hf-inv-freq", "hf") in names
    # the negative control shows the factors matter far beyond the parity limits
    assert data["negative_control"]["past"]["mean_kl"] > 100 * max(
        c["numbers"]["past"]["mean_kl"] for c in data["checks"] if c["name"] == "parity")
    assert "## Verification" in (good / "hf" / "README.md").read_text()


def _gguf_case(good, tmp_path, **rewrite):
    exp = tmp_path / "export"
    shutil.copytree(good / "export", exp)
    src = exp / "hf-q8_0.gguf" if "factor_scale" in rewrite else exp / "hf-f32.gguf"
    bad = rewrite_gguf(src, tmp_path / "bad.gguf", **rewrite)
    shutil.move(bad, src)
    return _run(src, "--checkpoint", good / "hf")


def test_fails_on_gguf_without_factor_tensor(good, tmp_path):
    res = _gguf_case(good, tmp_path, drop=("rope_freqs.weight",))
    assert res.exit_code == 1
    assert "gguf-factors [hf-f32.gguf]" in res.output and "parity" in res.output


def test_fails_on_gguf_context_left_at_original(good, tmp_path):
    res = _gguf_case(good, tmp_path, overrides={"llama.context_length": ORIGINAL})
    assert res.exit_code == 1 and "gguf-metadata [hf-f32.gguf]" in res.output
    assert "context_length 64 != target 256" in res.output


def test_fails_on_q8_0_with_altered_factors(good, tmp_path):
    res = _gguf_case(good, tmp_path, factor_scale=1.5)
    assert res.exit_code == 1
    assert "parity [hf-q8_0.gguf (q8_0)]" in res.output and "gguf-factors [hf-q8_0.gguf]" in res.output


def test_fails_on_config_whose_scaling_transformers_ignores(good, tmp_path):
    ck = tmp_path / "hf"
    shutil.copytree(good / "hf", ck)
    cfg = json.loads((ck / "config.json").read_text())
    # what a 4.x -> 5.x round trip or a fine-tuning stack does: the scaling block gone, the window kept
    edit_config(ck, rope_scaling=None, rope_parameters={"rope_type": "default", "rope_theta": cfg["rope_theta"]})
    res = _run(ck)
    assert res.exit_code == 1 and "hf-inv-freq" in res.output
    assert "ignores the scaling" in res.output


def test_verify_checks_the_temperature(good, tmp_path):
    names = {c["name"] for c in json.loads((good / "hf" / "verify.json").read_text())["checks"]}
    assert {"temperature-config", "hf-temperature"} <= names
    # a GGUF that lost its attn_factor key: metadata names it, and llama.cpp's logits move
    res = _gguf_case(good, tmp_path, drop=("llama.rope.scaling.attn_factor",))
    assert res.exit_code == 1 and "gguf-metadata [hf-f32.gguf]" in res.output
    assert "rope.scaling.attn_factor 1 != temperature" in res.output and "parity [hf-f32.gguf" in res.output


def test_verify_fails_on_keys_transformers_warns_about_or_a_wrong_temperature(good, tmp_path):
    ck = tmp_path / "hf"
    shutil.copytree(good / "hf", ck)
    cfg = json.loads((ck / "config.json").read_text())
    t = cfg["rope_scaling"]["attention_factor"]
    edit_config(ck, rope_scaling={**cfg["rope_scaling"], "short_mscale": t, "long_mscale": t})
    res = _run(ck)
    assert res.exit_code == 1 and "rope_scaling.short_mscale present: transformers 5.x warns" in res.output
    edit_config(ck, rope_scaling={**cfg["rope_scaling"], "attention_factor": 2 * t})
    res = _run(ck)
    assert res.exit_code == 1 and "temperature-config" in res.output and "!= temperature" in res.output


def test_manifest_describes_the_final_files_and_verify_checks_it(good, tmp_path):
    root = tmp_path / "out"
    shutil.copytree(good / "hf", root / "hf")
    export_outputs(root / "hf", root / "export", ("f32", "q8_0"), progress=False)
    manifest = root / "export" / "manifest.json"
    res = _run(root)
    assert res.exit_code == 0, res.output
    assert "| manifest | manifest.json | pass |" in res.output
    from convert.stages.export import manifest_entries, manifest_problems

    # verify rewrote the card and verify.json after the export hashed them: their entries follow
    listed = {p.resolve() for p in manifest_entries(manifest)}
    for f in ("hf/README.md", "hf/verify.json", "hf/config.json", "export/hf-f32.gguf", "export/hf-f32.Modelfile"):
        assert (root / f).resolve() in listed, f
    assert manifest_problems(manifest) == []

    # a file changed after export fails the check, naming it; the manifest is not refreshed over it
    with open(root / "export" / "hf-q8_0.Modelfile", "a") as f:
        f.write("PARAMETER temperature 2\n")
    for _ in range(2):
        res = _run(root)
        assert res.exit_code == 1 and "manifest [manifest.json]" in res.output
        assert "hf-q8_0.Modelfile differs from the manifest" in res.output
    # a listed file that is gone
    (root / "hf" / "tokenizer.json").unlink()
    res = _run(root / "export")
    assert res.exit_code == 1 and "tokenizer.json is missing" in res.output
