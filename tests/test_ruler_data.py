"""RULER's samples: only those scored are generated, the same ones lm-eval would score, once per tokenizer and
length (convert/evaluate/ruler_data.py)."""

import gzip
import json
import random

import numpy as np
import pytest
from click.testing import CliRunner

from convert.stages.bake import bake, make_plan
from convert.cli import main
from convert.evaluate.ruler_data import MODULES, ruler_module, ruler_samples
from convert.formats.checkpoint import open_source

DATASETS = [(mod, fns[0]) for mod, (fns, _) in MODULES.items()]  # niah_single_1, vt, cwe, fwe


@pytest.fixture(scope="module")
def smol_tokenizer():
    """SmolLM2's tokenizer (RULER's generators need a real vocabulary): the GGUF's tokenizer alone, its weights never
    dequantised."""
    from convert.formats.checkpoint import gguf_tokenizer_dir
    from test_smollm2 import smollm2_gguf

    return str(gguf_tokenizer_dir(smollm2_gguf()))


def generate(mod: str, fn: str, tokenizer: str, limit, cache=None) -> list[dict]:
    random.seed(0)  # lm-eval's simple_evaluate seeds these before it builds the task
    np.random.seed(0)
    with ruler_samples(cache, limit):
        return list(ruler_module(mod).__dict__[fn](tokenizer=tokenizer, max_seq_lengths=[4096])["test"])


@pytest.mark.parametrize("mod,fn", DATASETS)
def test_the_samples_generated_for_a_limit_are_the_first_of_a_longer_run(mod, fn, smol_tokenizer):
    """lm-eval scores the first ``limit`` documents; every generator draws its samples one after another, so
    generating only ``limit`` gives those same documents."""
    few, more = generate(mod, fn, smol_tokenizer, 3), generate(mod, fn, smol_tokenizer, 12)
    assert len(few) == 3 and len(more) == 12
    assert few == more[:3]
    assert len({r["input"] for r in more}) > 1  # distinct documents, not one repeated


@pytest.mark.slow
@pytest.mark.parametrize("mod,fn", DATASETS)
def test_the_first_samples_equal_lm_evals_full_500(mod, fn, smol_tokenizer):
    full = generate(mod, fn, smol_tokenizer, None)
    assert len(full) == 500
    assert generate(mod, fn, smol_tokenizer, 4) == full[:4]


def test_cwe_gives_the_same_documents_however_many_were_drawn_before(smol_tokenizer):
    """lm-eval's cwe draws from a module-level random.Random(42) it never reseeds: without the reset the second model
    of a comparison would be scored on other documents."""
    first = generate("cwe_utils.py", "get_cw_dataset", smol_tokenizer, 2)
    ruler_module("cwe_utils.py").__dict__["RNG"].random()  # something else drew from it meanwhile
    assert generate("cwe_utils.py", "get_cw_dataset", smol_tokenizer, 2) == first


def test_stored_samples_are_reused_for_the_next_model_and_nothing_is_regenerated(smol_tokenizer, tmp_path,
                                                                                  monkeypatch):
    from tiny import make_tiny
    from transformers import AutoTokenizer

    monkeypatch.setenv("DPROPE_CACHE", str(tmp_path / "cache"))
    tok = AutoTokenizer.from_pretrained(smol_tokenizer)
    base = make_tiny(tmp_path / "smoltok", "llama", tokenizer=tok)
    a = bake(open_source(base), tmp_path / "a", make_plan(target_length=256), progress=False)
    b = bake(open_source(base), tmp_path / "b", make_plan("yarn", 512), progress=False)
    args = ["--lengths", "4096", "--tasks", "niah_single_1,ruler_cwe", "--limit", "1"]
    res = CliRunner().invoke(main, ["validate", str(a), *args, "--out", str(tmp_path / "ra")])
    assert res.exit_code == 0, res.output
    stored = sorted((tmp_path / "cache" / "validate" / "ruler-data").glob("*.json.gz"))
    assert [p.name.split("-")[0] for p in stored] == ["get_cw_dataset", "niah_single_1"]
    assert all(len(json.loads(gzip.decompress(p.read_bytes()))) == 1 for p in stored)
    before = {p: p.read_bytes() for p in stored}

    def no_generation(*a, **k):
        raise AssertionError("RULER samples generated again")

    for mod, (_, gens) in MODULES.items():
        for g in gens:
            monkeypatch.setitem(ruler_module(mod).__dict__, g, no_generation)
    res = CliRunner().invoke(main, ["validate", str(b), *args, "--out", str(tmp_path / "rb")])
    assert res.exit_code == 0, res.output
    assert {p: p.read_bytes() for p in sorted(stored[0].parent.glob("*.json.gz"))} == before
    runs = json.loads((tmp_path / "rb" / "validation.json").read_text())["runs"]
    assert {r["task"] for r in runs} >= {"niah_single_1", "ruler_cwe"}
    ruler = [r for r in runs if r["task"] in ("niah_single_1", "ruler_cwe")]
    assert len(ruler) == 2 and all(v["effective"] == 1 for r in ruler for v in r["lm_eval"]["n-samples"].values())


@pytest.mark.bench
def test_the_benchmark_compares_with_lm_eval_as_shipped():
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "bench" / "ruler_samples.py"
    p = subprocess.run([sys.executable, str(script), "--length", "4096", "--tasks", "ruler_cwe", "--limit", "2"],
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-2000:]
    row = next(line for line in p.stdout.splitlines() if line.startswith("| ruler_cwe"))
    assert row.startswith("| ruler_cwe | 500, ") and "| 2, " in row and row.endswith("| yes |")


def test_loading_rulers_modules_prints_nothing_and_downloads_nothing():
    """lm-eval's prepare_niah.py asks NLTK for punkt_tab at import and prints "Downloaded punkt_tab" either way."""
    import subprocess
    import sys

    code = ("import nltk\n"
            "calls = []\n"
            "nltk.download = lambda *a, **k: calls.append(a)\n"  # what reaches NLTK's own download, if anything
            "from convert.evaluate.ruler_data import ruler_samples\n"
            "with ruler_samples(None, 1):\n"
            "    pass\n"
            "assert calls == [], calls\n")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    assert "punkt" not in p.stdout + p.stderr and "nltk" not in (p.stdout + p.stderr).lower()
