"""Validation of GGUF files in llama.cpp (lm-eval model dprope-gguf) against the HF path, on tiny random models.

Tolerances, f32 GGUF of the same checkpoint, windows of 256 tokens decoded in batches of 48:
- F32 KV cache: the two runtimes differ only by float32 summation order.  Rolling log-likelihood sums agree to a
  relative 1e-5 (observed 9e-8), per-token log-probabilities to 1e-3 absolute (observed 1e-4), loglikelihood
  requests (60 characters of continuation) to 1e-3 absolute (observed 6e-5), and greedy generations are the same
  strings.
- F16 KV cache (llama-cpp-python's default): rolling sums to a relative 1e-3 (observed 3e-5), per-token
  log-probabilities to 0.1 (observed 0.014), loglikelihood requests to 0.1 (observed 0.025).  These random models
  have large activations (weights ~N(0, 0.2)); SmolLM2's numbers are in the README.
"""

import json
import shutil

import numpy as np
import pytest
from click.testing import CliRunner

from convert.stages.bake import bake, make_plan
from convert.cli import main
from convert.formats.gguf_export import export_gguf
from convert.formats.checkpoint import open_source
from tiny import ORIGINAL

pytestmark = pytest.mark.runtime
TARGET = 4 * ORIGINAL
TOL = {"f32": {"rolling_rel": 1e-5, "token": 1e-3, "loglik": 1e-3},
       "f16": {"rolling_rel": 1e-3, "token": 0.1, "loglik": 0.1}}


@pytest.fixture(scope="module")
def files(tiny_models, tmp_path_factory):
    root = tmp_path_factory.mktemp("vg")
    base = tiny_models[("llama", False)]
    ext = bake(open_source(base), root / "ext", make_plan(target_length=TARGET), progress=False)
    return {"base": base, "ext": ext,
            "ext.gguf": export_gguf(ext, root / "ext-f32.gguf", "f32", progress=False),
            "base.gguf": export_gguf(base, root / "base-f32.gguf", "f32", progress=False)}


def _requests(kind, args):
    from lm_eval.api.instance import Instance

    return [Instance(kind, {}, a, i, metadata=("t", i, 1)) for i, a in enumerate(args)]


@pytest.fixture(scope="module")
def hf_reference(files):
    """What the HF path (ChunkedHFLM, the validate stage's model) answers on the same requests."""
    from pydoc_data.topics import topics
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from convert.evaluate.lmeval_hf import chunked_lm_class

    texts = [topics["assert"], topics["for"][:300], topics["if"]]
    ll = [(t[:200], t[200:260]) for t in texts]
    gen = [(t[:400], {"until": ["\n\n"], "max_gen_toks": 20, "do_sample": False}) for t in texts]
    model = AutoModelForCausalLM.from_pretrained(str(files["ext"])).eval()
    lm = chunked_lm_class()(pretrained=model, tokenizer=AutoTokenizer.from_pretrained(str(files["ext"])),
                            max_length=TARGET, batch_size=1, device="cpu")
    return {"texts": texts, "ll": ll, "gen": gen,
            "rolling": lm.loglikelihood_rolling(_requests("loglikelihood_rolling", [(t,) for t in texts]), True),
            "tokens": dict(lm.token_logprobs),
            "loglik": lm.loglikelihood(_requests("loglikelihood", ll), True),
            "generate": lm.generate_until(_requests("generate_until", gen), True)}


@pytest.mark.parametrize("kv_cache", ["f32", "f16"])
def test_f32_gguf_scores_like_the_hf_path(files, hf_reference, kv_cache):
    from convert.evaluate.lmeval_gguf import GGUFLM

    ref, tol = hf_reference, TOL[kv_cache]
    lm = GGUFLM(str(files["ext.gguf"]), max_length=TARGET, kv_cache=kv_cache, n_batch=48)
    try:
        assert lm.model.n_ctx == TARGET  # the file's context_length: the target
        rolling = lm.loglikelihood_rolling(_requests("loglikelihood_rolling", [(t,) for t in ref["texts"]]), True)
        assert len(lm.tok_encode(ref["texts"][0])) > 2 * TARGET  # several windows, each several batches
        assert np.allclose(rolling, ref["rolling"], rtol=tol["rolling_rel"], atol=0)
        for i in range(len(ref["texts"])):
            assert lm.token_logprobs[i].shape == ref["tokens"][i].shape
            assert np.abs(lm.token_logprobs[i] - ref["tokens"][i]).max() < tol["token"]
        loglik = lm.loglikelihood(_requests("loglikelihood", ref["ll"]), True)
        for (got, greedy), (want, want_greedy) in zip(loglik, ref["loglik"]):
            assert abs(got - want) < tol["loglik"] and greedy == want_greedy
        if kv_cache == "f32":
            gen = lm.generate_until(_requests("generate_until", ref["gen"]), True)
            assert gen == ref["generate"] and all(len(g) > 5 for g in gen)
    finally:
        lm.close()


def test_generate_until_stops_at_the_stop_string_and_the_token_budget(files):
    from convert.evaluate.lmeval_gguf import GGUFLM

    lm = GGUFLM(str(files["ext.gguf"]), max_length=128, kv_cache="f32")
    try:
        free = lm.generate_until(_requests("generate_until", [("The ", {"until": [], "max_gen_toks": 30})]), True)[0]
        toks = lm.model.greedy(lm.tok_encode("The "), 30, lambda t: False)
        assert len(toks) == 30 and free == lm.tok_decode(toks)  # no stop string: the whole budget
        stop = free[len(free) // 2 : len(free) // 2 + 2]
        cut = lm.generate_until(_requests("generate_until", [("The ", {"until": [stop], "max_gen_toks": 30})]),
                                True)[0]
        assert stop not in cut and free.startswith(cut) and len(cut) < len(free)
        # a prompt longer than max_length - max_gen_toks is left-truncated, as HFLM does
        long = " ".join(["word"] * 400)
        assert len(lm.generate_until(_requests("generate_until", [(long, {"max_gen_toks": 8})]), True)) == 1
    finally:
        lm.close()


def test_registered_in_lm_evals_model_registry(files):
    from lm_eval.api.registry import get_model

    from convert.evaluate.lmeval_gguf import GGUFLM

    cls = get_model("dprope-gguf")
    assert cls is GGUFLM
    lm = cls.create_from_arg_string(f"pretrained={files['ext.gguf']},max_length=128,kv_cache=f32")
    try:
        assert lm.max_length == 128 and lm.model.n_ctx == TARGET and lm.model.options.kv_cache == "f32"
    finally:
        lm.close()


def test_validate_gguf_end_to_end_cached_by_content(files, tmp_path, monkeypatch):
    import convert.stages.validate as V

    ext = tmp_path / "ext.gguf"
    shutil.copy(files["ext.gguf"], ext)
    out = tmp_path / "report"
    args = ["validate", str(ext), "--base", str(files["base.gguf"]), "--lengths", "64,256", "--tasks",
            "passkey,ppl", "--limit", "2", "--out", str(out), "--gate", "ppl@0-64 <= 100x base"]
    loads = []
    real = V.load_run
    monkeypatch.setattr(V, "load_run", lambda run: loads.append(run.label) or real(run))
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output
    assert loads == ["extended", "base"]
    data = json.loads((out / "validation.json").read_text())
    assert [r["name"] for r in data["rows"]] == ["passkey @64", "passkey @256", "ppl 0-64", "ppl 64-256"]
    assert all(r["base"] is not None and r["extended"] is not None for r in data["rows"])
    assert {r["runtime"] for r in data["runs"]} == {"llama.cpp"} and len(data["runs"]) == 8
    assert [m["n_ctx"] for m in data["models"]] == [TARGET, 256]  # the target; the base's 64 raised to 256
    md = (out / "validation.md").read_text()
    assert "(llama.cpp, n_ctx 256, KV cache f16, flash attention)" in md and "| ppl 64-256 |" in md
    assert "(n=2 docs)" in md and all(r["stats"]["extended"]["n"] == 2 and r["paired"] for r in data["rows"])
    assert "`ppl@0-64 <= 100x base`: pass" in md

    # the same files again: every result from the cache, nothing loaded, the same numbers
    loads.clear()
    assert CliRunner().invoke(main, args).exit_code == 0
    assert loads == [] and json.loads((out / "validation.json").read_text())["rows"] == data["rows"]

    # one byte of the extended file's last tensor changed: the extended model runs again, the base stays cached
    raw = bytearray(ext.read_bytes())
    raw[-5] ^= 0x01
    ext.write_bytes(bytes(raw))
    assert CliRunner().invoke(main, args).exit_code == 0
    assert loads == ["extended"]

    # the KV cache type is part of the identity; the thread count is not
    from convert.runtimes.llamacpp import LlamaCppOptions

    h = lambda **o: V.gguf_run("x", ext, [64], LlamaCppOptions(**o)).hash  # noqa: E731
    assert h(kv_cache="f16") != h(kv_cache="f32")
    assert h(kv_cache="f16", n_threads=1) == h(kv_cache="f16", n_threads=2)


def test_gguf_with_a_hf_base_runs_the_base_in_transformers(files, tmp_path):
    res = CliRunner().invoke(main, ["validate", str(files["ext.gguf"]), "--base", str(files["base"]), "--lengths",
                                    "64", "--tasks", "ppl", "--limit", "1", "--out", str(tmp_path)])
    assert res.exit_code == 0, res.output
    data = json.loads((tmp_path / "validation.json").read_text())
    assert {m["label"]: m["runtime"] for m in data["models"]} == {"extended": "llama.cpp", "base": "transformers"}


def test_a_bad_gguf_gives_one_clear_error(files, tmp_path):
    data = files["ext.gguf"].read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[: len(data) // 2])
    res = CliRunner().invoke(main, ["validate", str(cut), "--base", str(files["base.gguf"]), "--lengths", "64",
                                    "--tasks", "ppl", "--limit", "1", "--out", str(tmp_path / "r")])
    assert res.exit_code == 2
    lines = [ln for ln in res.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and "cut.gguf ends inside tensor" in lines[0]
    assert "truncated" in lines[0] and "Traceback" not in res.output
    assert not (tmp_path / "r").exists()


def test_tokenizer_disagreement_is_an_error_not_a_wrong_perplexity(tmp_path):
    from convert.errors import ConvertError
    from convert.evaluate.engine import Run, _check_token_count

    run = Run("extended", tmp_path / "m.gguf", "h", "llama.cpp", tmp_path / "tok")
    m = {"token_count": 15, "token_perplexity": 1.0}
    _check_token_count(run, {0: np.zeros(10), 1: np.zeros(5)}, m)
    assert m == {"token_count": 15, "token_perplexity": 1.0}  # agreeing counts change nothing
    with pytest.raises(ConvertError, match="into 15 tokens where the tokenizer .* counts 16"):
        _check_token_count(run, {0: np.zeros(10), 1: np.zeros(5)}, {"token_count": 16})
    # a few tokens apart in a long document (a SentencePiece vocabulary rebuilt by transformers): the perplexity is
    # over the tokens llama.cpp scored
    lp = {0: np.full(49145, -2.0, dtype=np.float32)}
    m = {"token_count": 49152, "loglik_sum": -98290.0, "token_perplexity": float(np.exp(98290.0 / 49152))}
    _check_token_count(run, lp, m)
    assert m["token_count"] == 49145 and m["token_count_tokenizer"] == 49152
    assert m["loglik_sum"] == pytest.approx(-98290.0) and m["token_perplexity"] == pytest.approx(np.exp(2.0))
    with pytest.raises(ConvertError, match="into 49145 tokens"):
        _check_token_count(run, lp, {"token_count": 49500})


def test_recipe_validates_the_checkpoint_and_its_gguf_and_the_card_shows_both(tiny_models, tmp_path):
    import yaml

    from convert.pipeline.run import run_recipe

    recipe = tmp_path / "tiny.yaml"
    recipe.write_text("# make tiny\n" + yaml.safe_dump({
        "name": "tiny", "source": str(tiny_models[("llama", False)]), "target_length": TARGET,
        "validate": {"outputs": ["hf", "f32"], "tasks": ["ppl"], "lengths": [64, 128], "limit": 1},
        "export": {"gguf": ["f32"]}}))
    run_dir = tmp_path / "run"
    s = run_recipe(recipe, run_dir, echo=lambda *_: None)
    assert s["stages"]["validate"] == "run" and set(s["validate"]["reports"]) == {"hf", "f32"}
    hf = json.loads((run_dir / "validation" / "validation.json").read_text())
    gg = json.loads((run_dir / "validation" / "f32" / "validation.json").read_text())
    assert {m["runtime"] for m in hf["models"]} == {"transformers"}
    assert [m["runtime"] for m in gg["models"]] == ["llama.cpp", "transformers"]  # a HF source: its base in HF
    ppl = lambda d: [r["extended"] for r in d["rows"]]  # noqa: E731
    assert np.allclose(ppl(gg), ppl(hf), rtol=1e-2)  # the f32 GGUF (f16 KV cache) measures the same model
    card = (run_dir / "hf" / "README.md").read_text()
    section = card.split("## Validation", 1)[1]
    assert "### hf: hf/ in transformers" in section and "### f32: `tiny-f32.gguf` in llama.cpp" in section
    assert section.count("| ppl 64-128 |") == 2
    assert "value [95% interval] (n)" in section and section.count("(n=1 blocks of") == 0  # n and intervals shown
    assert section.count("blocks of") >= 4  # one document: the intervals are over blocks of its positions
    # the manifest still describes the card the validation rewrote; nothing is left to do
    from convert.stages.export import manifest_problems

    assert manifest_problems(run_dir / "export" / "manifest.json") == []
    s = run_recipe(recipe, run_dir, dry_run=True, echo=lambda *_: None)
    assert set(s["stages"].values()) == {"skip (done)", "skip (not in recipe)"}
    # no longer validating the GGUF removes its report
    data = yaml.safe_load(recipe.read_text())
    data["validate"]["outputs"] = ["hf"]
    recipe.write_text("# make tiny\n" + yaml.safe_dump(data))
    s = run_recipe(recipe, run_dir, echo=lambda *_: None)
    assert s["stages"]["validate"] == "run" and not (run_dir / "validation" / "f32").exists()


@pytest.mark.parametrize("kv_cache", ["f32", "f16"])
def test_generate_until_decodes_a_shared_prefix_once_with_the_same_answers(files, monkeypatch, kv_cache):
    """Passkey-like prompts (one filler, a key at several depths): requests run in token order, each keeping the
    cache of the prefix it shares with the one before, so the shared filler is decoded once; the answers are those
    of an empty cache for every request (f16: with the fused attention, whose sums depend on the ubatch tiling)."""
    from pydoc_data.topics import topics

    from convert.evaluate.lmeval_gguf import GGUFLM
    from convert.runtimes.llamacpp import Decoder

    filler = topics["for"][:400]
    contexts = [filler[:cut] + f" The key is {key}. " + filler[cut:] + "\nThe key is"
                for cut, key in [(330, 123), (60, 456), (330, 789), (200, 321)]]
    reqs = _requests("generate_until", [(c, {"until": ["\n\n"], "max_gen_toks": 6}) for c in contexts])
    lm = GGUFLM(str(files["ext.gguf"]), max_length=TARGET, kv_cache=kv_cache, n_ubatch=16)
    try:
        prompts = [lm.tok_encode(c) for c in contexts]
        assert 100 < min(map(len, prompts)) and max(map(len, prompts)) <= TARGET - 6  # none truncated
        d = lm.model.decoder
        calls = []
        real = Decoder.decode
        monkeypatch.setattr(Decoder, "decode", lambda self, t, start=0, outputs=None:
                            calls.append((start, len(t))) or real(self, t, start, outputs))
        got = lm.generate_until(reqs, True)
        prompt_calls = [c for c in calls if c[1] > 1]
        assert len(prompt_calls) == 4  # one call per prompt: the part after the kept prefix
        order = sorted(range(4), key=lambda i: prompts[i])
        for (start, n), i, prev in zip(prompt_calls, order, [None] + order[:-1]):
            shared = 0 if prev is None else next(j for j, (x, y) in enumerate(zip(prompts[i], prompts[prev]))
                                                 if x != y)
            assert start == shared // 16 * 16 and start + n == len(prompts[i])
        assert sum(n for _, n in prompt_calls) < sum(map(len, prompts)) - 2 * 16

        # the same requests, each from an empty cache, in the order given
        monkeypatch.setattr(Decoder, "reuse", lambda self, tokens, most=None: self.clear() or 0)
        calls.clear()
        want = [lm.generate_until([r], True)[0] for r in reqs]
        assert [n for _, n in calls if n > 1] == [len(p) for p in prompts]
        assert got == want and all(want)
    finally:
        lm.close()


def test_rolling_perplexity_asks_only_for_the_scored_rows_in_bounded_slices(files):
    """lm-eval's rolling windows through dprope-gguf: llama.cpp is asked for the logits of every scored position
    once and of no other (the context prefix of the last, partial window is decoded with no output rows), at most
    the slice bound's rows per llama_decode call (LlamaCppOptions.logit_bytes, here 6 rows of the 512-token
    vocabulary, lowers n_ubatch to 4), and the per-token log-probabilities equal those of the whole window's logits
    (every row at once, reduced in float64 afterwards)."""
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
    from pydoc_data.topics import topics

    from convert.evaluate.lmeval_gguf import GGUFLM, GGUFModel
    from convert.runtimes.llamacpp import LlamaCppOptions

    L = 64
    text = topics["assert"]
    budget = 6 * 512 * 4
    with GGUFModel(files["ext.gguf"], TARGET, LlamaCppOptions(kv_cache="f32", logit_bytes=budget)) as m:
        d = m.decoder
        assert d.n_vocab == 512 and d.n_ubatch == d.max_rows == m.options.n_ubatch == 4
        lm = GGUFLM(m, max_length=L)
        lm.loglikelihood_rolling(_requests("loglikelihood_rolling", [(text,)]), True)
        got = lm.token_logprobs[0]
        ids = lm.tok_encode(text, add_special_tokens=False)
        windows = [make_disjoint_window(w) for w in get_rolling_token_windows(ids, lm.prefix_token_id, L, 1)]
        assert len(got) == len(ids) and len(windows) >= 3 and len(ids) % L  # the last window has a context prefix
        assert d.n_outputs == len(ids)  # one row per scored token, none for context
        assert d.n_decoded == len(windows) * L and d.n_decoded - d.n_outputs == L - len(ids) % L
        assert d.peak_outputs == 4 and d.peak_outputs * d.n_vocab * 4 <= budget  # never more rows at once

    with GGUFModel(files["ext.gguf"], TARGET, LlamaCppOptions(kv_cache="f32", logit_bytes=None)) as ref:
        want = []
        for context, cont in windows:
            ref.decoder.clear()
            inputs = (context + cont)[:-1]
            rows = np.concatenate([r.copy() for _, r in ref.decoder.decode(inputs)]).astype(np.float64)
            assert rows.shape == (L, 512) and ref.decoder.n_calls == len(want) + 1  # the whole window at once
            lse = rows.max(1) + np.log(np.exp(rows - rows.max(1, keepdims=True)).sum(1))
            tail = np.arange(L - len(cont), L)
            want.append(rows[tail, cont] - lse[tail])
    assert np.abs(got - np.concatenate(want)).max() < 1e-5
