"""bench/short_window_rank.py on a tiny model: factor sets with given full-length perplexities scored by the fit's
short-window objective, the rank correlations on fixed data, the --sets filter, one temperature for every set, and
a re-run that computes nothing."""

import json

import pytest
from scipy.stats import kendalltau, spearmanr

from tiny import ORIGINAL

pytestmark = pytest.mark.bench

TARGET = 4 * ORIGINAL


@pytest.fixture(scope="module")
def bench():
    import short_window_rank  # bench/ is on the path (conftest.py)

    return short_window_rank


def _results(path, source) -> str:
    """A search_proxy.json of four sets on the tiny model (8 rotary pairs), with made-up perplexities."""
    sets = [
        {"spec": "none", "kind": "method", "factors": [1.0] * 8, "temperature": 1.0, "ppl": 40.0, "ppl_past": 90.0},
        {"spec": "pi", "kind": "method", "factors": [4.0] * 8, "temperature": 1.0, "ppl": 30.0, "ppl_past": 31.0},
        {"spec": "yarn", "kind": "method", "factors": [1.0, 1.0, 1.2, 1.7, 2.5, 3.3, 4.0, 4.0],
         "temperature": 1.0693, "ppl": 20.0, "ppl_past": 21.0},
        {"spec": "bench-random:seed=0:index=1", "kind": "random", "factors": [1.0, 1.3, 1.6, 2.0, 2.6, 3.2, 4.1, 4.9],
         "temperature": 1.0377, "ppl": 22.0, "ppl_past": 23.0},
        {"spec": "unmeasured", "kind": "method", "factors": [1.0] * 8, "temperature": 1.0, "ppl": None,
         "ppl_past": None},
    ]
    path.write_text(json.dumps({"source": str(source), "original": ORIGINAL, "target": TARGET, "corpus": "pydoc",
                                "samples": 1, "sets": sets, "seconds": {"ppl": 1.5}}))
    return str(path)


def test_the_rank_correlations_on_fixed_data(bench):
    rows = [{"spec": s, "ppl": p, "ppl_past": q, "value": v} for s, p, q, v in [
        ("a", 10.0, 11.0, 2.0), ("b", 12.0, 13.0, 2.5), ("c", 11.0, 15.0, 2.4), ("d", 20.0, 30.0, 3.0),
        ("e", 9.0, 12.0, None)]]
    c = bench.rank_report(rows)
    # past the window the order of a, b, c, d is the objective's but for b and c swapped
    past = c["past the original window"]
    assert past["n"] == 4 and past["spearman"] == pytest.approx(0.8) and past["kendall"] == pytest.approx(4 / 6)
    assert c["whole window"]["spearman"] == pytest.approx(1.0) and c["whole window"]["kendall"] == pytest.approx(1.0)
    # e has no value: left out of everything, the best sets included
    assert c["best by the objective"] == "a" and c["best by ppl"] == "a" and c["best by ppl past the window"] == "a"
    want = spearmanr([2.0, 2.5, 2.4, 3.0], [11.0, 13.0, 15.0, 30.0]).statistic
    assert past["spearman"] == pytest.approx(want)


def test_short_window_ranking_against_full_length_perplexity(bench, tiny_models, tmp_path, monkeypatch):
    results = _results(tmp_path / "search_proxy.json", tiny_models[("llama", False)])
    out = tmp_path / "out"
    args = ["--results", results, "--window", "32", "--chunks", "2", "--samples", "2", "--out", str(out),
            "--cache", str(tmp_path / "cache")]
    assert bench.main(args) == 0
    name = f"short-window-rank-{TARGET}-w32-c2"
    rep = json.loads((out / f"{name}.json").read_text())
    assert [r["spec"] for r in rep["sets"]] == ["none", "pi", "yarn", "bench-random:seed=0:index=1"]
    for r in rep["sets"]:
        assert r["value"] > 0 and r["temperature"] == r["set_temperature"] and r["scored"] > 0 and r["seconds"] > 0
    assert len({r["value"] for r in rep["sets"]}) == 4  # four sets, four values
    xs = [r["value"] for r in rep["sets"]]
    c = rep["correlation"]
    assert c["past the original window"]["spearman"] == pytest.approx(
        spearmanr(xs, [r["ppl_past"] for r in rep["sets"]]).statistic)
    assert c["whole window"]["kendall"] == pytest.approx(kendalltau(xs, [r["ppl"] for r in rep["sets"]]).statistic)
    assert rep["tokens_per_eval"] == 2 * 32 and rep["tokens_processed"] == 4 * 2 * 32 and rep["evaluations"] == 4
    assert rep["seconds_per_eval"] > 0 and rep["target"] == TARGET and rep["original"] == ORIGINAL
    assert rep["date"] and "cpu" in rep["machine"]
    md = (out / f"{name}.md").read_text()
    assert "Spearman rho" in md and "Command: `python bench/short_window_rank.py --results" in md
    assert "| bench-random:seed=0:index=1 | random | 1.0377 |" in md and "64 tokens forward" in md

    # a re-run reads every value back from the store beside the report
    from convert.evaluate.fit import ShortWindowObjective

    def never(*a, **k):
        raise AssertionError("evaluated again")

    real = ShortWindowObjective.__call__
    monkeypatch.setattr(ShortWindowObjective, "__call__", never)
    assert bench.main(args) == 0
    again = json.loads((out / f"{name}.json").read_text())
    assert [r["value"] for r in again["sets"]] == xs and again["correlation"] == rep["correlation"]
    monkeypatch.setattr(ShortWindowObjective, "__call__", real)

    # --sets and one temperature for every set: the none set reads the same factors at LongRoPE's temperature
    assert bench.main([*args, "--sets", "none,yarn", "--temperature-mode", "fixed"]) == 0
    fixed = json.loads((out / f"{name}-fixed.json").read_text())
    assert [r["spec"] for r in fixed["sets"]] == ["none", "yarn"]
    assert all(r["temperature"] == fixed["fixed_temperature"] for r in fixed["sets"])
    assert fixed["fixed_temperature"] == pytest.approx((1 + 2 * 0.6931471805599453 / 4.1588830833596715) ** 0.5)
    assert fixed["sets"][0]["value"] != rep["sets"][0]["value"]
    assert fixed["correlation"]["whole window"]["spearman"] is None  # two sets rank nothing


def test_bad_settings_are_one_error(bench, tiny_models, tmp_path, capsys):
    results = _results(tmp_path / "search_proxy.json", tiny_models[("llama", False)])
    base = ["--results", results, "--out", str(tmp_path / "out"), "--cache", str(tmp_path / "cache")]
    assert bench.main([*base, "--window", str(TARGET)]) == 2
    assert f"pass window < {TARGET}" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="no set nope"):
        bench.main([*base, "--window", "32", "--sets", "none,nope"])


def test_the_ranking_within_each_temperature_on_fixed_data(bench):
    """Sets that share a temperature are ranked among themselves (what a fit with a fixed temperature needs); groups
    of fewer than three are left out; the mean is weighted by group size; the stored proxy is ranked alike."""
    rows = [{"spec": s, "set_temperature": t, "ppl_past": q, "value": v, "proxy": {"proxy": p}}
            for s, t, q, v, p in [("a", 1.0, 10.0, 1.0, 3.0), ("b", 1.0, 11.0, 2.0, 2.0), ("c", 1.0, 12.0, 3.0, 1.0),
                                  ("d", 1.05, 10.0, 2.0, 1.0), ("e", 1.05, 11.0, 1.0, 2.0), ("f", 1.05, 12.0, 3.0, 3.0),
                                  ("g", 1.05, 13.0, 4.0, 4.0), ("h", 1.2, 9.0, 9.0, 9.0)]]
    bt = bench.by_temperature(rows)
    g = {x["temperature"]: x for x in bt["groups"]}
    assert set(g) == {1.0, 1.05}  # h alone at 1.2: no ranking
    assert g[1.0]["spearman"] == pytest.approx(1.0) and g[1.0]["proxy_spearman"] == pytest.approx(-1.0)
    want = spearmanr([2.0, 1.0, 3.0, 4.0], [10.0, 11.0, 12.0, 13.0]).statistic  # 0.8
    assert g[1.05]["spearman"] == pytest.approx(want)
    assert bt["objective_sets"] == 7
    assert bt["objective_weighted_spearman"] == pytest.approx((3 * 1.0 + 4 * want) / 7)
    assert bt["proxy_weighted_spearman"] == pytest.approx((3 * -1.0 + 4 * 1.0) / 7)
