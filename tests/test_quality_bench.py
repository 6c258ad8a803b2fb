"""bench/quality.py end to end on a tiny model: every registered method baked and scored by lm-eval on the same
samples, tables, plots, and a cached re-run that computes nothing."""

import json

import pytest

pytestmark = pytest.mark.bench

@pytest.fixture(scope="module")
def bench():
    import quality  # bench/ is on the path (conftest.py)

    return quality


METHODS = ["none", "pi", "yarn", "dprope-paper", "dprope"]


def test_methods_through_the_pipeline(bench, tiny_models, tmp_path, capsys):
    corpus = tmp_path / "other.txt"
    from pydoc_data.topics import topics

    corpus.write_text("\n\n".join(topics[k] for k in sorted(topics)[::-1][:80]))
    args = ["--source", str(tiny_models[("llama", False)]), "--targets", "256", "--corpora", f"pydoc,{corpus}",
            "--samples", "2", "--passkey", "1", "--methods", ",".join(METHODS), "--passkey-lengths", "256", "--out", str(tmp_path / "out"),
            "--cache", str(tmp_path / "cache"), "--evals", str(tmp_path / "evals")]
    assert bench.main(args) == 0
    data = json.loads((tmp_path / "out" / "quality-256.json").read_text())
    assert data["methods"] == METHODS
    ppl = [r for r in data["results"] if r["task"] == "ppl"]
    assert len(ppl) == 2 * len(data["methods"])
    for r in ppl:
        assert len(r["metrics"]["block_ll"]) == 2  # the same two documents for every method
        assert r["metrics"]["token_perplexity"] > 1
    # methods differ past the window, and every table row is filled
    past = {r["method"]: r["metrics"]["token_perplexity"] for r in ppl if r["corpus"] == "pydoc"}
    assert len({round(v, 6) for v in past.values()}) > len(past) // 2
    md = (tmp_path / "out" / "quality-256.md").read_text()
    for m in data["methods"]:
        assert f"| {m} |" in md
    assert "past-window ppl vs yarn" in md and "1.000x [1.000, 1.000]" in md  # yarn against itself, paired
    pngs = sorted((tmp_path / "out").glob("*.png"))
    assert len(pngs) == 2 and all(p.read_bytes()[:4] == b"\x89PNG" for p in pngs)
    # a second run computes nothing: every result comes from the cache
    capsys.readouterr()
    assert bench.main(args) == 0
    again = json.loads((tmp_path / "out" / "quality-256.json").read_text())
    assert all(r["seconds"] is None for r in again["results"])
    assert [r["metrics"] for r in again["results"]] == [r["metrics"] for r in data["results"]]


def test_ratio_against_yarn_is_paired_over_blocks(bench):
    import math

    ref = {"block": 128, "block_ll": [[-64.0] * 8, [-64.0] * 8]}  # two 1024-token documents, nll 0.5 per token
    pm = {"block": 128, "block_ll": [[-128.0] * 8, [-64.0] * 4 + [-192.0] * 4]}
    r = bench.ratio_vs(pm, ref, 512, 1024, 1024)  # the second half: nll 1.0 and 1.5 per token against 0.5
    assert r["value"] == pytest.approx(math.exp(1.25 - 0.5)) and r["unit"] == "blocks" and r["n"] >= 4
    assert r["lo"] < r["value"] < r["hi"]  # the blocks differ, so the interval is not a point
    same = bench.ratio_vs(ref, ref, 512, 1024, 1024)
    assert same["value"] == same["lo"] == same["hi"] == pytest.approx(1.0)
    assert bench.ratio_vs(pm, ref, 100, 1024, 1024) is None  # off the block grid
    assert bench.fmt_ratio(r, "-").startswith(f"{r['value']:.3f}x [") and bench.fmt_ratio(None, "0.9x") == "0.9x"


def test_bucket_and_curve_arithmetic(bench):
    import math

    block_ll = [[-128.0, -256.0], [-128.0 * 2, -128.0]]  # two docs, two 128-token blocks each
    assert bench.bucket_ppl(block_ll, 128, 0, 128, [256, 256]) == pytest.approx(math.exp(1.5))
    assert bench.bucket_ppl(block_ll, 128, 128, 256, [256, 256]) == pytest.approx(math.exp(1.5))
    assert bench.bucket_ppl(block_ll, 128, 0, 256, [256, 256]) == pytest.approx(math.exp(1.5))
    assert bench.buckets(8192, 32768) == [(0, 4096), (4096, 8192), (8192, 16384), (16384, 32768), (0, 8192),
                                          (8192, 32768)]
    assert bench.parse_spec("dprope-ramp:temperature=yarn:low=0.001") == ("dprope-ramp",
                                                                          {"temperature": "yarn", "low": 0.001})


def test_a_search_row_runs_at_a_reduced_budget_and_prints_the_gpu_command(bench, tiny_models, tmp_path):
    spec = "longrope-search:population=6:parents=3:mutations=2:crossovers=2"
    args = ["--source", str(tiny_models[("llama", False)]), "--targets", "256", "--corpora", "pydoc", "--tasks",
            "ppl", "--methods", f"none,{spec}", "--search-budget", "9", "--out", str(tmp_path / "out"),
            "--cache", str(tmp_path / "cache"), "--evals", str(tmp_path / "evals")]
    assert bench.main(args) == 0
    data = json.loads((tmp_path / "out" / "quality-256.json").read_text())
    (s,) = data["searches"]
    assert s["options"]["fitness"] == "proxy" and s["options"]["budget_evals"] == 9
    assert "--method longrope-search --fitness ppl --budget 1344 --opt population=6" in s["full_budget_command"]
    md = (tmp_path / "out" / "quality-256.md").read_text()
    assert f"| {spec} |" in md and s["full_budget_command"] in md
    (model,) = (tmp_path / "cache" / "models").glob("longrope-search-256-*")
    trace = json.loads((model / "search_trace.json").read_text())
    assert trace["evals"] == 9 and trace["fitness"] == "proxy"
    ppl = {r["method"]: r["metrics"]["token_perplexity"] for r in data["results"]}
    assert ppl[spec] != pytest.approx(ppl["none"], rel=1e-3)


def test_dpe_static_and_runtime_rows(bench, tiny_models, tmp_path):
    spec = "groups=2:multipliers=[0.25,1,4]:samples=1:needles=1:metric=logprob:window=8"
    args = ["--source", str(tiny_models[("llama", False)]), "--targets", "512", "--corpora", "pydoc", "--tasks", "ppl",
            "--samples", "1", "--passkey", "0", "--methods", f"none,dpe:{spec},dpe-runtime:{spec}",
            "--out", str(tmp_path / "out"), "--cache", str(tmp_path / "cache"), "--evals", str(tmp_path / "evals")]
    assert bench.main(args) == 0
    data = json.loads((tmp_path / "out" / "quality-512.json").read_text())
    assert data["methods"] == ["none", f"dpe:{spec}", f"dpe-runtime:{spec}"]
    ppl = {r["method"].split(":")[0]: r["metrics"]["token_perplexity"] for r in data["results"]}
    assert len({round(v, 6) for v in ppl.values()}) == 3  # the static form, the runtime and the base all differ
    # the runtime row used the scales the static row detected: one detection, one baked model
    assert len(list((tmp_path / "cache" / "models").glob("dpe-512-*"))) == 1
    assert "evaluation only" in data["method_info"][f"dpe-runtime:{spec}"]
    md = (tmp_path / "out" / "quality-512.md").read_text()
    assert f"| dpe-runtime:{spec} |" in md and f"| dpe:{spec} |" in md
    assert bench.split_methods("a,b:x=[1,2]:y=3,c") == ["a", "b:x=[1,2]:y=3", "c"]
