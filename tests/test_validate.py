"""Validation through real lm-eval on a tiny random checkpoint, and the pieces of the report."""

import json
import math

import pytest
from click.testing import CliRunner

from convert.stages.bake import bake, make_plan
from convert.cli import main
from convert.errors import ConvertError
from convert.formats.checkpoint import open_source
from convert.evaluate.tasks import passkey
from convert.evaluate.engine import local_haystack
from convert.evaluate.results import Gate, check_gates, ppl_buckets, table_rows
from tiny import ORIGINAL


def test_passkey_scorer():
    assert passkey.score(" 12345. Remember", "12345") == 1.0
    assert passkey.score("The pass key is 12345", "12345") == 1.0
    assert passkey.score(" 123456", "12345") == 0.0  # a longer number is not the key
    assert passkey.score(" 12345678", "12345") == 0.0
    assert passkey.score(" 012345", "12345") == 0.0
    assert passkey.score(" 54321", "12345") == 0.0
    assert passkey.score(" 1234", "12345") == 0.0
    assert passkey.score("", "12345") == 0.0


def test_passkey_prompt_fits_and_places_the_key(tokenizer, tmp_path):
    tokenizer.save_pretrained(str(tmp_path))
    tok = passkey.load_tokenizer(str(tmp_path))
    for depth in (0.1, 0.9):
        p = passkey.build_prompt(tok, 400, depth, "31415")
        n = len(tok(p, add_special_tokens=False).input_ids)
        assert 400 - passkey.GEN_SLACK - 40 < n <= 400 - passkey.GEN_SLACK
        # the key's place within the filler (between the introduction and the question)
        start, end = len(passkey.INTRO), p.index(passkey.QUESTION)
        needle_len = len(" The pass key is 31415. Remember it. 31415 is the pass key. ")
        rel = (p.index(" The pass key is 31415") - start) / (end - start - needle_len)
        assert abs(rel - depth) < 0.05
    ds = passkey.make_dataset(length=300, tokenizer=str(tmp_path), per_depth=2)["test"]
    assert [round(d, 1) for d in ds["depth"]] == [0.1, 0.5, 0.9, 0.1, 0.5, 0.9]
    assert len(set(ds["answer"])) > 1


def test_ppl_buckets_difference_the_prefix_sums():
    # two documents; per-length sums of log-likelihood and token counts over the same documents
    rows = {100: {"loglik_sum": -200.0, "token_count": 200}, 300: {"loglik_sum": -1000.0, "token_count": 600}}
    b = ppl_buckets(rows, [100, 300])
    assert b[(0, 100)] == pytest.approx(math.exp(1.0))
    assert b[(100, 300)] == pytest.approx(math.exp(800 / 400))


def test_ppl_buckets_split_at_the_window_from_the_block_sums():
    # one run at 300 over two documents, block sums of 50 tokens: an edge at 100 (the base's window) splits 0-300
    docs = [[-50.0] * 6, [-100.0] * 6]  # 1 nat / token in the first document, 2 in the second
    rows = {300: {"loglik_sum": -900.0, "token_count": 600, "block": 50, "block_ll": docs}}
    b = ppl_buckets(rows, [300], edges=[100])
    assert b[(0, 300)] == pytest.approx(math.exp(1.5))  # the whole bucket stays
    assert b[(0, 100)] == pytest.approx(math.exp(300 / 200)) and b[(100, 300)] == pytest.approx(math.exp(600 / 400))
    docs[1] = [-100.0, -100.0, -150.0, -150.0, -150.0, -150.0]  # worse after the window
    rows[300]["loglik_sum"] = -1100.0
    b = ppl_buckets(rows, [300], edges=[100])
    assert b[(0, 100)] == pytest.approx(math.exp(1.5)) and b[(100, 300)] == pytest.approx(math.exp(800 / 400))
    # an edge off the block grid, one past the documents, or one that is a length changes nothing
    assert set(ppl_buckets(rows, [300], edges=[120])) == {(0, 300)}
    assert set(ppl_buckets(rows, [300], edges=[300, 400])) == {(0, 300)}
    both = {100: {"loglik_sum": -200.0, "token_count": 200}, 300: rows[300]}
    assert ppl_buckets(both, [100, 300], edges=[100]) == ppl_buckets(both, [100, 300])


def _acc(model, task, length, k, n):
    """A run result with per-prompt scores: k of n correct."""
    return {"model": model, "task": task, "length": length,
            "metrics": {"acc": k / n, "samples": [1.0] * k + [0.0] * (n - k)}}


def _ppl(model, length, nll_per_doc, tokens=64):
    """A perplexity run over documents with the given mean negative log-likelihood per token."""
    ll = [-x * tokens for x in nll_per_doc]
    return {"model": model, "task": "ppl", "length": length,
            "metrics": {"loglik_sum": sum(ll), "token_count": tokens * len(ll), "doc_ll": ll,
                        "doc_tokens": [tokens] * len(ll)}}


def test_gates_parse_and_decide_on_the_95_percent_bound():
    import numpy as np

    base_nll = list(np.log(np.linspace(9.5, 10.5, 20)))
    runs = [_acc("base", "passkey", 256, 4, 20), _acc("extended", "passkey", 256, 20, 20),
            _ppl("base", 64, base_nll), _ppl("extended", 64, [x + np.log(1.04) for x in base_nll])]
    rows = table_rows(runs, [64, 256])
    gates = [Gate.parse("passkey@256 >= 0.8"), Gate.parse("ppl@0-64 <= 1.05x base"),
             Gate.parse("ppl@0-64 <= 1.01x base"), Gate.parse("passkey@512 >= 0.5"),
             Gate.parse("passkey@256 >= 0.9"), Gate.parse("passkey@256 >= 2x base")]
    failed = {g.text: why for g, why in check_gates(rows, gates)}
    # 20 of 20: Wilson lower bound 0.839, so >= 0.8 holds and >= 0.9 does not, though the point estimate is 1.0
    assert set(failed) == {"ppl@0-64 <= 1.01x base", "passkey@512 >= 0.5", "passkey@256 >= 0.9"}
    assert "lower bound 0.8389 is not >= 0.9" in failed["passkey@256 >= 0.9"]
    assert "not measured" in failed["passkey@512 >= 0.5"]
    row = next(r for r in rows if r["task"] == "ppl")
    assert row["paired"]["value"] == pytest.approx(1.04) and row["paired"]["hi"] == pytest.approx(1.04)
    with pytest.raises(ConvertError, match="not understood"):
        Gate.parse("passkey is good")
    with pytest.raises(ConvertError, match="bucket"):
        Gate.parse("ppl@4096 <= 10")


def test_a_gate_holding_on_the_point_estimate_but_not_on_its_bound_fails():
    # 19 of 20 = 0.95 >= 0.9, but the Wilson interval is [0.764, 0.991]: a release cannot be decided on it
    rows = table_rows([_acc("extended", "passkey", 64, 19, 20)], [64])
    (gate, why), = check_gates(rows, [Gate.parse("passkey@64 >= 0.9")])
    assert rows[0]["extended"] == 0.95 and "lower bound 0.7639" in why
    # perplexity 1.03x base on average, but with documents this spread the ratio's upper bound is above 1.05
    base = [2.0, 2.6, 1.6, 2.2, 3.0]
    ext = [2.0 + d for d in (0.1, -0.05, 0.12, -0.02, 0.0)]
    rows = table_rows([_ppl("base", 64, base), _ppl("extended", 64, ext)], [64])
    s = rows[0]["paired"]
    assert s["value"] < 1.05 < s["hi"] and s["n"] == 5 and s["unit"] == "documents"
    (gate, why), = check_gates(rows, [Gate.parse("ppl@0-64 <= 1.05x base")])
    assert "upper bound" in why
    # the same gate with the lower bound, an accuracy relative to the base
    rows = table_rows([_acc("base", "passkey", 64, 10, 20), _acc("extended", "passkey", 64, 12, 20)], [64])
    assert check_gates(rows, [Gate.parse("passkey@64 >= 1.1x base")])  # 0.6 >= 0.55 on the point, not the bound
    assert not check_gates(rows, [Gate.parse("passkey@64 >= 0.5x base")])


def test_gates_naming_what_the_run_does_not_make_are_refused_before_it_runs(extended_llama, tmp_path):
    from convert.evaluate.results import gate_problems

    probs = gate_problems(["passkey@512 >= 0.5", "ppl@0-100 <= 1.1x base", "ruler@64 >= 0.5", "ppl@0-64 <= 2",
                           "passkey-multi@64 >= 0.5"], ["passkey", "ppl"], [64, 256])
    assert len(probs) == 4
    assert "gate 'passkey@512 >= 0.5' names length 512; the run scores passkey at 64, 256" in probs[0]
    assert "bucket 0-100" in probs[1] and "make 0-64, 64-256" in probs[1]
    assert "needs a RULER task" in probs[2] and "passkey-multi" in probs[3]
    assert not gate_problems(["ppl@64-128 <= 2"], ["ppl"], [64, 256], window=128)  # split at the base's window
    res = CliRunner().invoke(main, ["validate", str(extended_llama), "--lengths", "64", "--tasks", "passkey",
                                    "--limit", "1", "--out", str(tmp_path / "r"), "--gate", "passkey@128 >= 0.5"])
    assert res.exit_code == 2 and "names length 128" in res.output and not (tmp_path / "r").exists()


def test_table_rows_side_by_side():
    runs = [{"model": m, "task": "passkey", "length": L, "metrics": {"acc": a}}
            for m, L, a in (("base", 64, 1.0), ("base", 128, 0.0), ("extended", 64, 1.0), ("extended", 128, 0.5))]
    rows = table_rows(runs, [64, 128])
    assert [(r["name"], r["base"], r["extended"]) for r in rows] == [("passkey @64", 1.0, 1.0),
                                                                   ("passkey @128", 0.0, 0.5)]


def test_per_sample_scores_are_kept_for_ruler_and_averaged_with_intervals():
    from convert.evaluate.engine import _metric

    logged = [{"doc_id": 1, "filter": "none", "4096": 1.0, "8192": -1.0},
              {"doc_id": 0, "filter": "none", "4096": 0.5, "8192": -1.0}]
    m = _metric("niah_single_1", 4096, {"results": {"niah_single_1": {"4096,none": 0.75}},
                                        "samples": {"niah_single_1": logged}})
    assert m == {"score": 0.75, "samples": [0.5, 1.0]}
    runs = [{"model": mod, "task": t, "length": 4096, "metrics": {"score": sum(x) / len(x), "samples": x}}
            for mod, t, x in (("base", "niah_single_1", [0.0, 1.0, 0.0, 0.0]), ("base", "ruler_vt", [0.2, 0.4, 0.6]),
                              ("extended", "niah_single_1", [1.0, 1.0, 0.0, 1.0]),
                              ("extended", "ruler_vt", [0.4, 0.4, 0.8]))]
    rows = {r["name"]: r for r in table_rows(runs, [4096])}
    avg = rows["ruler average @4096"]
    assert avg["extended"] == pytest.approx((0.75 + 1.6 / 3) / 2) and avg["stats"]["extended"]["n"] == 7
    assert avg["stats"]["extended"]["method"].startswith("stratified")
    assert avg["paired"]["value"] == pytest.approx(avg["extended"] - avg["base"]) and avg["paired"]["n"] == 7
    assert rows["niah_single_1 @4096"]["stats"]["base"]["method"] == "Wilson score"
    assert rows["ruler_vt @4096"]["stats"]["base"]["method"].startswith("percentile bootstrap")
    assert not check_gates(list(rows.values()), [Gate.parse("ruler@4096 >= 0.1")])
    assert check_gates(list(rows.values()), [Gate.parse("ruler@4096 >= 0.6")])  # 0.64 on the point, not the bound


def test_local_haystack_swaps_and_restores():
    from convert.evaluate.engine import ruler_niah_module

    nu = ruler_niah_module()  # the module object lm-eval's YAML loader calls
    pn = nu.generate_samples.__globals__
    before = nu.get_haystack, pn["cached_sent_tokenize"]
    with local_haystack("First sentence here. Second one follows! Third?"):
        assert nu.get_haystack("essay")[:2] == ["First", "sentence"]
        assert pn["cached_sent_tokenize"]("A b. C d.") == ["A b.", "C d."]
        assert nu.get_haystack("repeat").startswith("The grass is green")
    assert (nu.get_haystack, pn["cached_sent_tokenize"]) == before


@pytest.fixture(scope="module")
def extended_llama(tiny_models, tmp_path_factory):
    root = tmp_path_factory.mktemp("val")
    return bake(open_source(tiny_models[("llama", False)]), root / "ext", make_plan(target_length=4 * ORIGINAL),
                progress=False)


def test_validate_end_to_end_through_lm_eval(extended_llama, tiny_models, tmp_path):
    out = tmp_path / "report"
    args = ["validate", str(extended_llama), "--base", str(tiny_models[("llama", False)]), "--lengths", "64,256",
            "--tasks", "passkey,ppl", "--limit", "2", "--out", str(out), "--gate", "ppl@0-64 <= 100x base"]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output
    for f in ("validation.json", "validation.md", "validation.png"):
        assert (out / f).stat().st_size > 100
    data = json.loads((out / "validation.json").read_text())
    names = [r["name"] for r in data["rows"]]
    assert names == ["passkey @64", "passkey @256", "ppl 0-64", "ppl 64-256"]
    assert all(r["base"] is not None and r["extended"] is not None for r in data["rows"])
    # every cell carries n and its 95% interval, and the paired comparison on the same samples
    for r in data["rows"]:
        for m in ("base", "extended"):
            s = r["stats"][m]
            assert s["n"] == 2 and s["lo"] <= s["value"] <= s["hi"] and s["value"] == pytest.approx(r[m])
        assert r["paired"]["n"] == 2 and r["paired"]["lo"] <= r["paired"]["value"] <= r["paired"]["hi"]
    assert {r["stats"]["base"]["unit"] for r in data["rows"]} == {"prompts", "documents"}
    runs = data["runs"]
    assert len(runs) == 8 and all(r["lm_eval"]["n-samples"] for r in runs)
    assert all(len(r["metrics"]["samples"]) == 2 for r in runs if r["task"] == "passkey")
    assert all(len(r["metrics"]["doc_ll"]) == 2 for r in runs if r["task"] == "ppl")
    ppl = {(r["model"], r["length"]): r["metrics"] for r in runs if r["task"] == "ppl"}
    # the same two documents, four times as long: about four times the tokens
    assert 3.5 < ppl[("extended", 256)]["token_count"] / ppl[("extended", 64)]["token_count"] <= 4
    md = (out / "validation.md").read_text()
    assert "| ppl 64-256 |" in md and "(n=2 docs)" in md and "95% interval" in md
    # the second run comes from the cache: no model can be loaded and nothing evaluated, same numbers
    def no_load(*a, **k):
        raise AssertionError("a model was loaded although every result is cached")

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("convert.runtimes.hf.load_hf", no_load)
        mp.setattr("transformers.AutoModelForCausalLM.from_pretrained", no_load)
        mp.setattr("lm_eval.simple_evaluate", no_load)
        res2 = CliRunner().invoke(main, args)
        assert res2.exit_code == 0, f"{res2.output}\n{res2.exception!r}"
        assert json.loads((out / "validation.json").read_text())["rows"] == data["rows"]
        # --split-at: the same runs, the bucket it falls in also in its two parts (from the cache too)
        res3 = CliRunner().invoke(main, [*args, "--split-at", "128"])
        assert res3.exit_code == 0, f"{res3.output}\n{res3.exception!r}"
        split = [r["name"] for r in json.loads((out / "validation.json").read_text())["rows"]]
        assert {"ppl 64-128", "ppl 128-256", "ppl 64-256"} <= set(split)
        res4 = CliRunner().invoke(main, [*args, "--split-at", "999"])
        assert res4.exit_code != 0 and "--split-at 999 lies outside" in res4.output


def test_failing_gate_exits_non_zero(extended_llama, tmp_path, monkeypatch):
    import shlex

    args = ["validate", str(extended_llama), "--lengths", "64", "--tasks", "passkey", "--limit", "1", "--out",
            str(tmp_path), "--gate", "passkey@64 >= 1.1"]
    monkeypatch.setattr("sys.argv", ["dprope", *args])
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 1
    assert "passkey@64 >= 1.1" in res.output and "gate(s) failed" in res.output
    # the report records a command that a shell runs as given (gates quoted)
    recorded = (tmp_path / "validation.md").read_text().split("`")[1]
    assert shlex.split(recorded) == ["dprope", *args]


def test_hub_tasks_are_refused_with_a_reason(extended_llama, tmp_path):
    res = CliRunner().invoke(main, ["validate", str(extended_llama), "--tasks", "qa_squad", "--out", str(tmp_path)])
    assert res.exit_code == 2 and "hub" in res.output


def test_ruler_tasks_offline_including_an_essay_task(tmp_path):
    """Stock RULER niah_single_1 and the essay-haystack niah_single_2 (local haystack), through lm-eval, on a tiny
    model with SmolLM2's real-sized tokenizer (RULER's generators need a real vocabulary)."""
    from transformers import AutoTokenizer

    from convert.formats.checkpoint import gguf_to_hf
    from test_smollm2 import smollm2_gguf
    from tiny import make_tiny

    tok = AutoTokenizer.from_pretrained(str(gguf_to_hf(smollm2_gguf())))
    base = make_tiny(tmp_path / "smoltok", "llama", tokenizer=tok)
    ext = bake(open_source(base), tmp_path / "ext", make_plan(target_length=256), progress=False)
    res = CliRunner().invoke(main, ["validate", str(ext), "--lengths", "4096", "--tasks", "niah_single_1,niah_single_2",
                                    "--limit", "1", "--out", str(tmp_path / "r")])
    assert res.exit_code == 0, res.output
    data = json.loads((tmp_path / "r" / "validation.json").read_text())
    got = {r["task"]: r for r in data["runs"]}
    for t in ("niah_single_1", "niah_single_2"):
        assert got[t]["metrics"]["score"] is not None and got[t]["lm_eval"]["n-samples"]
    assert "ruler average @4096" in [r["name"] for r in data["rows"]]


def test_validation_cache_is_keyed_by_content(tiny_copy, tmp_path):
    """A weight byte changed at the end of a file (the old key read only the first MB) or an edited corpus file
    is a cache miss."""
    from convert.evaluate.engine import Run, cache_file, model_hash

    d = tiny_copy("llama")
    w = next(d.glob("*.safetensors"))
    before = model_hash(d)
    data = bytearray(w.read_bytes())
    data[-3] ^= 0xFF  # the last tensor's bytes
    w.write_bytes(bytes(data))
    after = model_hash(d)
    assert before != after
    corpus = tmp_path / "c.txt"
    corpus.write_text("one text")
    a = cache_file(tmp_path, Run("x", d, after), "ppl", 128, 1, str(corpus), 128)
    corpus.write_text("another text")
    b = cache_file(tmp_path, Run("x", d, after), "ppl", 128, 1, str(corpus), 128)
    assert a != b
