"""bench/short_window_heldout.py on a tiny model: every set scored on the same held-out windows of two corpora, a
set's value its objective there, the report's ratios against YaRN."""

import json
import math

import pytest

from tiny import ORIGINAL

pytestmark = pytest.mark.bench

TARGET = 4 * ORIGINAL


def test_sets_on_held_out_text(tiny_models, tmp_path):
    import short_window_heldout as bench  # bench/ is on the path (conftest.py)

    out = tmp_path / "out"
    src = str(tiny_models[("llama", False)])
    args = ["--source", src, "--target", str(TARGET), "--methods", "none,yarn,dprope,factors:long=[2,2,2,2,2,2,2,2]",
            "--window", "32", "--chunks", "2", "--samples", "2", "--head", "3000", "--out", str(out), "--cache",
            str(tmp_path / "cache")]
    assert bench.main(args) == 0
    rep = json.loads((out / f"short-window-heldout-{TARGET}-w32-c2.json").read_text())
    assert set(rep["corpora"]) == {"pydoc-head", "licenses"}
    for c in rep["corpora"].values():
        rows = {r["spec"]: r for r in c["rows"]}
        assert list(rows) == ["none", "yarn", "dprope", "factors:long=[2,2,2,2,2,2,2,2]"]
        assert rows["factors:long=[2,2,2,2,2,2,2,2]"]["factors"] == [2.0] * 8
        assert rows["yarn"]["temperature"] == pytest.approx(0.1 * math.log(4) + 1)
        assert all(r["ppl"] == pytest.approx(math.exp(r["value"])) and r["scored"] > 0 for r in rows.values())
        assert len({r["value"] for r in rows.values()}) == 4
    md = (out / f"short-window-heldout-{TARGET}-w32-c2.md").read_text()
    assert "| yarn | 1.1386 |" in md and "1.000x |" in md and "pydoc's first 3000 tokens" in md
