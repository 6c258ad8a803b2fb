"""passkey-multi: K keys in one haystack, K questions on its KV cache, in transformers and in llama.cpp."""

import json

import pytest
from click.testing import CliRunner

from convert.cli import main
from convert.evaluate.tasks import passkey_multi as pm
from convert.evaluate.tasks.passkey import GEN_SLACK
from convert.formats.checkpoint import open_source
from convert.stages.bake import bake, make_plan

TARGET = 512


@pytest.fixture(scope="module")
def ext(tiny_models, tmp_path_factory):
    return bake(open_source(tiny_models[("llama", False)]), tmp_path_factory.mktemp("pm") / "ext",
                make_plan(target_length=TARGET), progress=False)


@pytest.fixture(scope="module")
def hf_model(ext):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(str(ext)).eval(), AutoTokenizer.from_pretrained(str(ext))


@pytest.mark.parametrize("family", ["gpt-2", "spm"])
def test_every_key_sits_at_its_depth(family, tokenizer):
    from tiny import tiny_tokenizer

    tok = tokenizer if family == "gpt-2" else tiny_tokenizer("spm")
    for length in (512, 2048) if family == "gpt-2" else (512,):
        p, q = pm.make_prompts(tok, length, 2, seed=3)
        K = len(p["keys"])
        assert K == pm.n_keys(tok, length) and K >= 6 and len(set(p["keys"])) == K and len(set(p["words"])) == K
        assert p["keys"] != q["keys"]  # each haystack has its own keys
        ids = tok(p["haystack"], add_special_tokens=False).input_ids
        assert len(ids) == p["n_tokens"]
        longest_q = max(len(tok(x, add_special_tokens=False).input_ids) for x in p["questions"])
        assert length - GEN_SLACK - longest_q - 40 < len(ids) <= length - GEN_SLACK - longest_q
        body = len(ids) - p["intro_tokens"]
        for pos, depth, w, key in zip(p["positions"], p["depths"], p["words"], p["keys"]):
            # the needle starts in the token at the position recorded (which may hold the end of the word before
            # it: SentencePiece merges ".▁"), at its depth
            assert tok.decode(ids[pos : pos + 40]).find(f"The pass key for {w} is {key}.") in (0, 1, 2)
            assert f"pass key for {w}" not in tok.decode(ids[:pos])
            assert abs((pos - p["intro_tokens"]) / body - depth) < 0.02
        assert p["depths"] == [(i + 0.5) / K for i in range(K)]


def _greedy_reference(generate, prefix, suffix, stop, eos=(), max_new=pm.MAX_NEW):
    """What the prompt prefix + suffix answers alone, from an empty cache, cut where generate_after stops."""
    out = []
    for t in generate(list(prefix) + list(suffix), max_new):
        if t in eos:
            break
        out.append(t)
        if stop(out):
            break
    return out


def test_transformers_decodes_the_haystack_once_with_the_answers_of_whole_prompts(hf_model):
    from convert.runtimes.hf import TransformersRuntime

    model, tok = hf_model
    rt = TransformersRuntime.wrap(model)
    prompts = pm.make_prompts(tok, TARGET, 2)
    encode = lambda text, special: tok(text, add_special_tokens=special).input_ids  # noqa: E731
    decode = lambda ids: tok.decode(ids, skip_special_tokens=True)  # noqa: E731
    m = pm.run(rt, encode, decode, prompts)
    K = len(prompts[0]["keys"])
    assert m["n"] == 2 * K == len(m["samples"]) == len(m["sample_ids"]) and m["keys_per_prompt"] == K
    assert set(m["samples"]) <= {0.0, 1.0} and m["acc"] == sum(m["samples"]) / m["n"]
    # tokens run through the model: each haystack once, then each question and its answer
    hay = m["haystack_tokens"]
    assert m["tokens_processed"] < sum(hay) + K * 2 * (30 + pm.MAX_NEW)
    assert m["tokens_processed"] < m["tokens_separate"] / 4
    # the same answers as every whole prompt generated alone (transformers' own generate)
    stop = lambda t: pm.answered(decode(t))  # noqa: E731
    p = prompts[0]
    prefix = encode(p["haystack"], True)
    want = [_greedy_reference(rt.generate, prefix, encode(p["haystack"] + q, True)[len(prefix):], stop,
                              {model.config.eos_token_id}) for q in p["questions"]]
    assert m["answers"][:K] == [decode(w) for w in want]


def test_a_sliding_window_cache_is_copied_not_cropped(tmp_path, tokenizer):
    """Gemma 3's local layers keep only their window: each question starts from a copy of the prefill's cache."""
    from transformers import AutoModelForCausalLM

    from convert.runtimes.hf import TransformersRuntime
    from tiny import make_tiny

    model = AutoModelForCausalLM.from_pretrained(str(make_tiny(tmp_path / "g", "gemma3_text", tokenizer=tokenizer)))
    rt = TransformersRuntime.wrap(model.eval())
    ids = tokenizer(" ".join(["The grass is green."] * 30)).input_ids
    suffixes = [tokenizer(f" Question {i} is").input_ids for i in range(3)]
    got = rt.generate_after(ids, suffixes, 6)
    want = [_greedy_reference(rt.generate, ids, s, lambda t: False, {model.config.eos_token_id}, 6) for s in suffixes]
    assert len(ids) > 4 * model.config.sliding_window and got == want
    assert rt.tokens_processed == len(ids) + sum(len(s) + len(g) - 1 for s, g in zip(suffixes, got))


@pytest.mark.runtime
def test_llama_cpp_keeps_the_haystack_in_its_context(ext, tmp_path, tokenizer):
    from convert.evaluate.lmeval_gguf import GGUFModel
    from convert.formats.gguf_export import export_gguf
    from convert.runtimes.llamacpp import LlamaCppOptions, LlamaCppRuntime

    gguf = export_gguf(ext, tmp_path / "ext-f32.gguf", "f32", progress=False)
    with GGUFModel(gguf, TARGET, LlamaCppOptions(kv_cache="f32", n_ubatch=16)) as model:
        llm = model.llm
        rt = LlamaCppRuntime.wrap(llm, model.decoder, gguf)
        encode = lambda text, special: llm.tokenize(text.encode(), add_bos=special, special=True)  # noqa: E731
        decode = lambda ids: llm.detokenize(ids).decode("utf-8", errors="replace")  # noqa: E731
        prompts = pm.make_prompts(tokenizer, TARGET, 2)
        K = len(prompts[0]["keys"])
        before = model.decoder.n_decoded
        m = pm.run(rt, encode, decode, prompts)
        assert m["tokens_processed"] == model.decoder.n_decoded - before
        # each haystack decoded once, then each question and its answer only
        bound = sum(m["haystack_tokens"]) + 2 * K * (30 + pm.MAX_NEW)
        assert m["tokens_processed"] <= bound and m["tokens_processed"] < m["tokens_separate"] / 4
        assert m["n"] == 2 * K and len(m["samples"]) == 2 * K
        # the answers of each whole prompt from an empty cache (the f32 cache: unfused attention, whose sums do not
        # depend on where the ubatches are cut)
        p = prompts[1]
        prefix = encode(p["haystack"], True)
        stop = lambda t: pm.answered(decode(t))  # noqa: E731
        want = [_greedy_reference(rt.generate, prefix, encode(p["haystack"] + q, True)[len(prefix):], stop)
                for q in p["questions"]]
        assert m["answers"][K:] == [decode(w) for w in want]
        rt.close()  # a wrapped runtime leaves the model open
        assert model.decoder.n_ctx == TARGET and llm.n_ctx() == TARGET


def _validate(args):
    res = CliRunner().invoke(main, ["validate", *args])
    assert res.exit_code == 0, f"{res.output}\n{res.exception!r}"
    return res


def test_validate_runs_passkey_multi_with_n_and_intervals(ext, tiny_models, tmp_path):
    out = tmp_path / "r"
    _validate([str(ext), "--base", str(tiny_models[("llama", False)]), "--lengths", f"256,{TARGET}", "--tasks",
               "passkey-multi", "--limit", "2", "--out", str(out), "--gate", f"passkey-multi@{TARGET} >= 0"])
    data = json.loads((out / "validation.json").read_text())
    assert [r["name"] for r in data["rows"]] == ["passkey-multi @256", f"passkey-multi @{TARGET}"]
    for r in data["rows"]:
        for m in ("base", "extended"):
            s = r["stats"][m]
            assert s["method"] == "Wilson score" and s["n"] > 2 and s["n"] % 2 == 0 and s["lo"] <= s["value"] <= s["hi"]
        assert r["paired"]["n"] == r["stats"]["base"]["n"]
    runs = {(r["model"], r["length"]): r["metrics"] for r in data["runs"]}
    m = runs[("extended", TARGET)]
    assert m["n"] == 2 * m["keys_per_prompt"] and m["tokens_processed"] < m["tokens_separate"]
    md = (out / "validation.md").read_text()
    assert f"| passkey-multi @{TARGET} |" in md and f"(n={m['n']})" in md
    assert f"`passkey-multi@{TARGET} >= 0`: pass" in md


@pytest.mark.runtime
def test_validate_runs_passkey_multi_on_a_gguf(ext, tiny_models, tmp_path):
    from convert.formats.gguf_export import export_gguf

    gguf = export_gguf(ext, tmp_path / "ext-f32.gguf", "f32", progress=False)
    out = tmp_path / "r"
    _validate([str(gguf), "--lengths", str(TARGET), "--tasks", "passkey-multi", "--limit", "2", "--out", str(out)])
    data = json.loads((out / "validation.json").read_text())
    (run,) = data["runs"]
    assert run["runtime"] == "llama.cpp" and run["metrics"]["n"] == 2 * run["metrics"]["keys_per_prompt"]
    assert run["metrics"]["tokens_processed"] < run["metrics"]["tokens_separate"]
    s = data["rows"][0]["stats"]["extended"]
    assert s["n"] == run["metrics"]["n"] and s["lo"] <= s["value"] <= s["hi"]
