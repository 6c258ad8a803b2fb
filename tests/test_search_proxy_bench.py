"""bench/search_proxy.py on a tiny model: factor sets baked and scored by lm-eval and by the proxies, rank
correlations, and a re-run that computes nothing."""

import json

import pytest
import torch

pytestmark = pytest.mark.bench

@pytest.fixture(scope="module")
def bench():
    import search_proxy  # bench/ is on the path (conftest.py)

    return search_proxy


def test_proxy_against_full_length_perplexity(bench, tiny_models, tmp_path, monkeypatch):
    from dprope.search import is_valid

    args = ["--source", str(tiny_models[("llama", False)]), "--target", "256", "--methods", "none,yarn,pi",
            "--random", "2", "--proxies", "proxy,proxy:chunk=64:task=key", "--out", str(tmp_path / "out"),
            "--cache", str(tmp_path / "cache"), "--evals", str(tmp_path / "evals")]
    assert bench.main(args) == 0
    rep = json.loads((tmp_path / "out" / "search_proxy.json").read_text())
    assert [r["spec"] for r in rep["sets"]] == ["none", "yarn", "pi", "bench-random:seed=0:index=0",
                                               "bench-random:seed=0:index=1"]
    for r in rep["sets"]:
        assert r["ppl"] > 1 and r["ppl_past"] > 1 and set(r["proxy"]) == set(rep["proxies"])
        if r["kind"] == "random":
            assert is_valid(torch.tensor(r["factors"]), 4.0, 0.01)
    assert len({round(r["ppl"], 6) for r in rep["sets"]}) == 5  # five different sets, five different numbers
    for p in rep["proxies"]:
        c = rep["correlation"][p]["whole window"]
        assert c["n"] == 5 and -1 <= c["spearman"] <= 1 and -1 <= c["kendall"] <= 1
        assert rep["seconds"][p] > 0
    assert rep["seconds"]["ppl"] > 0  # every full-length evaluation ran here
    md = (tmp_path / "out" / "search_proxy.md").read_text()
    assert "Spearman rho" in md and "| bench-random:seed=0:index=1 | random |" in md
    assert (tmp_path / "out" / "search_proxy.png").read_bytes()[:4] == b"\x89PNG"

    # a re-run reads every value back: no lm-eval run, no proxy evaluation
    import convert.evaluate.fitness
    import convert.stages.validate

    def never(*a, **k):
        raise AssertionError("evaluated again")

    monkeypatch.setattr(convert.stages.validate, "run_one", never)
    monkeypatch.setattr(convert.evaluate.fitness.ModelFitness, "__call__", never)
    assert bench.main(args) == 0
    again = json.loads((tmp_path / "out" / "search_proxy.json").read_text())
    assert again["sets"] == rep["sets"] and again["correlation"] == rep["correlation"]
