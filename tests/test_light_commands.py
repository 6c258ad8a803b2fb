"""The GGUF-only commands stay light: `extend` and `run` with a GGUF source and a GGUF output, `inspect` of a GGUF,
`factors` of a method that needs no model, and `methods` import neither torch nor transformers (nor lm-eval or
accelerate, which import them); the in-place commands do not import the gguf package either (its __init__ pulls in
its reader, writer and yaml: ~70 ms a command), only the header tables.  Each command runs in a fresh interpreter, as users type it, and that interpreter
reports which of those modules it loaded.  bench/gguf_inplace.py times the same commands against `cp`."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest
import yaml

from test_smollm2 import smollm2_gguf

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "transformers", "lm_eval", "accelerate", "safetensors.torch", "gguf", "yaml")
NO_TORCH = [m for m in HEAVY if m not in ("gguf", "yaml")]

# the CLI's own entry point, then the heavy modules this interpreter holds (printed last, as JSON)
PROBE = """
import json, sys
from convert.cli import main
try:
    main(sys.argv[1:], prog_name="dprope")
except SystemExit as e:
    code = e.code
else:
    code = 0
print(json.dumps({"code": code, "heavy": [m for m in %r if m in sys.modules]}))
""" % (HEAVY,)


def _run(*args: str) -> tuple[dict, str]:
    p = subprocess.run([sys.executable, "-c", PROBE, *args], capture_output=True, text=True, cwd=ROOT, timeout=600)
    lines = p.stdout.strip().splitlines()
    assert lines, p.stderr[-2000:]
    return json.loads(lines[-1]), p.stdout + p.stderr


def _gemma3_header(path: Path) -> Path:
    """A Gemma 3 GGUF as llama.cpp's converter lays out its rope keys (gguf-py's GGUFWriter), with two small tensors:
    enough for an in-place extension, whose form for this arch is the YaRN fit (llama.cpp's gemma3 graph reads no
    factor tensor)."""
    w = gguf.GGUFWriter(str(path), "gemma3")
    w.add_context_length(2048)
    w.add_embedding_length(64)
    w.add_head_count(2)
    w.add_head_count_kv(1)
    w.add_key_length(64)
    w.add_value_length(64)
    w.add_rope_freq_base(1e6)
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((16, 64), dtype=np.float32))
    w.add_tensor("output_norm.weight", np.ones(64, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("light")
    return {"llama": smollm2_gguf(), "gemma3": _gemma3_header(root / "gemma3.gguf"), "root": root}


@pytest.mark.parametrize("which,target", [("llama", 16384), ("gemma3", 8192)])
def test_extend_in_place_and_inspect_import_no_torch(sources, which, target):
    out = sources["root"] / f"{which}-ext.gguf"
    got, text = _run("extend", str(sources[which]), str(out), "--target-length", str(target))
    assert got == {"code": 0, "heavy": []}, text
    assert out.is_file() and ("rope_freqs" if which == "llama" else "yarn") in text
    got, text = _run("inspect", str(out))
    assert got == {"code": 0, "heavy": []}, text
    assert f"context_length: {target}" in text


def test_factors_and_methods_import_no_torch(sources):
    got, text = _run("factors", "--model", str(sources["llama"]), "--target-length", "32768")
    assert got["code"] == 0 and not set(got["heavy"]) & set(NO_TORCH), text
    assert "interpolation" in text or "factor" in text
    got, text = _run("factors", "--rope-theta", "10000", "--head-dim", "128", "--original-length", "4096",
                     "--target-length", "8192", "--method", "dprope-paper", "--json")
    assert got["code"] == 0 and not set(got["heavy"]) & set(NO_TORCH), text
    got, text = _run("methods")
    assert got["code"] == 0 and not set(got["heavy"]) & set(NO_TORCH), text


def test_header_tables_are_gguf_pys():
    """The type tables the header reader keeps so that it needs no gguf import are gguf-py's own values."""
    from convert.io.gguf_constants import constants
    from convert.io.gguf_meta import GGML_SIZES, VALUE_TYPES

    for tid, (name, block, size) in GGML_SIZES.items():
        qt = gguf.GGMLQuantizationType(tid)
        assert (qt.name, *gguf.GGML_QUANT_SIZES[qt]) == (name, block, size)
    assert VALUE_TYPES == {t.name: int(t) for t in gguf.GGUFValueType}
    assert constants().GGML_QUANT_SIZES == gguf.GGML_QUANT_SIZES  # gguf is imported here: its own module


def test_a_method_that_runs_the_model_still_can(sources):
    """The light path does not break the heavy one: a search method on a GGUF in place is refused with its reason
    (it would need the model), and that refusal imports nothing heavy either."""
    out = sources["root"] / "search.gguf"
    got, text = _run("extend", str(sources["llama"]), str(out), "--target-length", "16384", "--method",
                     "longrope-search", "--budget", "1")
    assert got["code"] == 2 and "runs the model" in text and got["heavy"] == []
    assert not out.exists()


def test_run_in_place_without_validation_imports_no_torch(sources, tmp_path):
    """`dprope run` of a recipe that extends a GGUF in place and verifies it in llama.cpp.  (Validation runs lm-eval,
    which imports torch: a recipe that validates pays for it.)"""
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({
        "name": "gemma3-light", "source": str(sources["gemma3"]), "target_length": 32768,
        "export": {"in_place": True, "gguf": []}, "validate": {"outputs": ["in-place"], "tasks": []}}))
    got, text = _run("run", str(recipe), "--run-dir", str(tmp_path / "run"), "--to", "export")
    assert got == {"code": 0, "heavy": ["yaml"]}, text  # the recipe is YAML
    assert (tmp_path / "run" / "export" / "gemma3-light-in-place.gguf").is_file()
    assert "skip (validate.tasks is empty)" in text
