"""bench/passkey_multi.py on a tiny model: passkey and passkey-multi on the same model and length, each with its n,
Wilson interval, wall time and tokens, and the markdown comparing them."""

import json

import pytest

from convert.formats.checkpoint import open_source
from convert.stages.bake import bake, make_plan

pytestmark = pytest.mark.bench

TARGET = 512


def test_single_and_multi_side_by_side(tiny_models, tmp_path):
    import passkey_multi as bench  # bench/ is on the path (conftest.py)

    ext = bake(open_source(tiny_models[("llama", False)]), tmp_path / "ext", make_plan(target_length=TARGET),
               progress=False)
    out = tmp_path / "out"
    args = ["--model", str(ext), "--length", str(TARGET), "--single", "3", "--multi", "1", "--out", str(out),
            "--cache", str(tmp_path / "cache"), "--quiet"]
    assert bench.main(args) == 0
    rep = json.loads((out / f"passkey-multi-vs-single-{TARGET}.json").read_text())
    single, multi = rep["rows"]["passkey"], rep["rows"]["passkey-multi"]
    assert single["stat"]["n"] == 3 and single["stat"]["method"] == "Wilson score"
    assert multi["stat"]["n"] >= 6 and multi["stat"]["method"] == "Wilson score"  # K keys of one haystack
    assert multi["tokens_processed"] < multi["tokens_separate"]
    for r in (single, multi):
        assert r["stat"]["lo"] <= r["acc"] <= r["stat"]["hi"] and r["seconds"] > 0
    md = (out / f"passkey-multi-vs-single-{TARGET}.md").read_text()
    assert f"| passkey | 3 | 3 |" in md and f"| passkey-multi | 1 | {multi['stat']['n']} |" in md
    assert "Seconds per retrieval sample" in md and "Newcombe" in md
    # a second run reads both from the cache
    assert bench.main(args) == 0
    again = json.loads((out / f"passkey-multi-vs-single-{TARGET}.json").read_text())
    assert again["rows"]["passkey-multi"]["acc"] == multi["acc"]


def test_difference_is_newcombes_interval():
    """Newcombe (1998, Statistics in Medicine 17:873) Table II, example (a): 56/70 vs 48/80, method 10 gives
    0.2 with 95% interval (0.0524, 0.3339)."""
    import passkey_multi as bench

    d, lo, hi = bench.difference({"acc": 56 / 70, "stat": {"n": 70}}, {"acc": 48 / 80, "stat": {"n": 80}})
    assert d == pytest.approx(0.2) and lo == pytest.approx(0.0524, abs=5e-5) and hi == pytest.approx(0.3339, abs=5e-5)
