"""GGUF in, GGUF out (`dprope extend model.gguf out.gguf`): tiny models of each architecture converted by llama.cpp's own
converter, as users' GGUFs are made, then extended in place.  Every tensor but the rope ones keeps its bytes, llama.cpp
runs the file, and it runs the model transformers runs from the HF extension of the same source; the extension
takes effect past the window (negative control: the source GGUF) and llama.cpp computes the same rotation on its
own from the same parameters (its linear scaling / its YaRN given as context parameters)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from convert.arch import lookup_arch
from convert.cli import main
from convert.errors import ConvertError
from convert.formats.checkpoint import open_source
from convert.runtimes.base import max_abs_diff, open_runtime
from convert.stages.bake import bake, bake_gguf, make_plan
from test_smollm2 import smollm2_gguf
from tiny import ORIGINAL, make_tiny

pytestmark = pytest.mark.runtime
TARGET = 4 * ORIGINAL
CONVERTED = ("llama", "llama3", "mistral", "qwen2", "qwen3", "gemma3_text", "phi3")
# the tokenizer each is converted with: SmolLM2's, which the converter recognises ("smollm"), but for Qwen2, whose
# tokenizer transformers always loads as Qwen2Tokenizer (so only Qwen2's own vocabulary hashes to a pre-tokenizer the
# converter knows: llamacpp_convert.qwen2_tokenizer), and Phi-3, whose converter reads a SentencePiece tokenizer.model
# (conversion/phi.py Phi3MiniModel.set_vocab: tiny.spm_tokenizer)
TOKENIZER = {"qwen2": "qwen2", "phi3": "spm"}
# the form llama.cpp's graph for the converted arch reads (convert/arch.py): per-pair factors in rope_freqs.weight
# (llama), the YaRN fit (qwen2, qwen3, gemma3: no factor tensor), longrope's rope_factors_long/short (phi3)
FORM = {"llama": "rope_freqs", "llama3": "rope_freqs", "mistral": "rope_freqs", "qwen2": "yarn-fit",
        "qwen3": "yarn-fit", "gemma3_text": "yarn-fit", "phi3": "rope_factors"}


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, dict[str, Path]]:
    """{arch: {hf: tiny HF source, gguf: its f32 GGUF by llama.cpp's converter, ext: the GGUF extended in place,
    hf_ext: the HF source extended, in the form the in-place GGUF carries}}"""
    from transformers import AutoTokenizer

    from convert.formats.checkpoint import gguf_tokenizer_dir
    from llamacpp_convert import convert_many, qwen2_tokenizer
    from tiny import spm_tokenizer

    root = tmp_path_factory.mktemp("in-place")
    toks = {"smollm": AutoTokenizer.from_pretrained(str(gguf_tokenizer_dir(smollm2_gguf()))),
            "qwen2": qwen2_tokenizer(), "spm": spm_tokenizer(root / "spm")}
    out = {}
    hfs = {mt: make_tiny(root / mt, mt, tokenizer=toks[TOKENIZER.get(mt, "smollm")]) for mt in CONVERTED}
    ggufs = dict(zip(CONVERTED, convert_many([(hfs[mt], root / f"{mt}.gguf") for mt in CONVERTED])))
    for mt in CONVERTED:
        hf, gguf = hfs[mt], ggufs[mt]
        ext = root / f"{mt}-ext.gguf"
        s = bake_gguf(gguf, ext, make_plan(target_length=TARGET), progress=False)
        hf_ext = bake(open_source(hf), root / f"{mt}-hf-ext", make_plan(target_length=TARGET), progress=False)
        if FORM[mt] == "yarn-fit" and not lookup_arch(mt).hf_yarn:
            _carry_the_fit(hf_ext, open_source(hf), s)
        out[mt] = {"hf": hf, "gguf": gguf, "ext": ext, "hf_ext": hf_ext}
    return out


def _carry_the_fit(hf_ext: Path, src, summary: dict) -> None:
    """Qwen2's HF output keeps the exact factors (`dprope export-gguf` writes it as arch llama, whose graph reads
    rope_freqs.weight: convert/arch.py), but llama.cpp's converter makes it arch qwen2, whose graph reads no factor
    tensor, so its in-place GGUF carries the YaRN fit: give the HF extension the config that fit stands for, as
    convert/formats/hf.py yarn_config writes it for qwen3 / gemma3."""
    from types import SimpleNamespace

    from convert.formats.hf import yarn_config

    plan = make_plan(target_length=TARGET)
    cfg = yarn_config(src.config, plan.spec_for(src.spec), plan, SimpleNamespace(**summary["yarn_fit"]),
                      summary["temperature"], {})  # (the last two: provenance only)
    (hf_ext / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")


def _tensors(path: Path) -> dict[str, tuple[str, bytes]]:
    """name -> (type, the bytes in the file), read at the offsets of the header (convert/io/gguf_meta.py, whose
    offsets tests/test_gguf_rewrite.py checks against gguf-py's GGUFReader; the reader itself walks Qwen2's 151k
    vocabulary strings one by one, seconds per file)."""
    from convert.io.gguf_meta import read_gguf

    out = {}
    with open(path, "rb") as f:
        for t in read_gguf(path).tensors:
            f.seek(t.offset)
            out[t.name] = (t.tensor_type.name, f.read(t.n_bytes))
    return out


def _meta(path: Path) -> dict:
    from convert.arch import gguf_fields

    return gguf_fields(path)[0]


def _ids(n: int, gguf: Path | None = None) -> list[int]:
    """``n`` token ids of the file's vocabulary (below 40000: SmolLM2's 49152, Qwen2's 151936, the tiny Phi-3's
    SentencePiece 1005)."""
    vocab = int(_meta(gguf)["tokenizer.ggml.tokens#len"]) if gguf is not None else 40000
    return np.random.default_rng(3).integers(100, min(40000, vocab), n).tolist()


@pytest.mark.parametrize("mt", CONVERTED)
def test_tensors_but_the_rope_ones_keep_their_bytes(models, mt):
    src, ext = _tensors(models[mt]["gguf"]), _tensors(models[mt]["ext"])
    rope = {"rope_freqs.weight", "rope_factors_long.weight"}  # Phi-3's short factors stay (its own window's)
    assert {k: v for k, v in src.items() if k not in rope} == {k: v for k, v in ext.items() if k not in rope}
    meta = _meta(models[mt]["ext"])
    arch = meta["general.architecture"]
    assert meta[f"{arch}.context_length"] == TARGET and meta["dprope.rope_form"] == FORM[mt]
    if FORM[mt] == "rope_freqs":
        assert "rope_freqs.weight" in ext and ext["rope_freqs.weight"][0] == "F32"
        assert f"{arch}.rope.scaling.type" not in meta and f"{arch}.rope.scaling.factor" not in meta
    elif FORM[mt] == "rope_factors":  # llama.cpp's phi3 graph: long factors past rope.scaling.original_context_length
        assert ext["rope_factors_long.weight"][0] == "F32" and ext["rope_factors_long.weight"] != \
            src["rope_factors_long.weight"] and "rope_freqs.weight" not in ext
        orig = meta[f"{arch}.rope.scaling.original_context_length"]
        assert orig == _meta(models[mt]["gguf"])[f"{arch}.rope.scaling.original_context_length"] == ORIGINAL // 2
        assert meta[f"{arch}.rope.scaling.attn_factor"] == pytest.approx(
            np.sqrt(1 + np.log(TARGET / orig) / np.log(orig)), rel=1e-6)  # Phi-3's own scale at the new length
        assert f"{arch}.rope.scaling.type" not in meta
    else:  # llama.cpp's qwen2 / qwen3 / gemma3 graphs read no factor tensor: none is written
        assert "rope_freqs.weight" not in ext and meta[f"{arch}.rope.scaling.type"] == "yarn"


@pytest.mark.parametrize("mt", CONVERTED)
def test_llama_cpp_runs_what_transformers_runs(models, mt):
    m = models[mt]
    ids = _ids(ORIGINAL + 48, m["gguf"])  # one sequence across the original window
    with open_runtime("transformers", m["hf_ext"]) as hf, open_runtime("llama.cpp", m["ext"], n_ctx=TARGET) as cpp:
        ref, got = hf.logits(ids), cpp.logits(ids)
    # the two runtimes' own difference on the unextended model (Gemma's GELU and norms differ in the last digits)
    with open_runtime("transformers", m["hf"]) as hf0, open_runtime("llama.cpp", m["gguf"], n_ctx=TARGET) as base:
        base_logits = base.logits(ids)
        floor = max_abs_diff(hf0.logits(ids[:ORIGINAL]), base_logits[:ORIGINAL])
    assert max_abs_diff(ref, got) < max(2e-3, 1.5 * floor), mt
    # negative control: the source file rotates otherwise past the window
    assert max_abs_diff(got[ORIGINAL:], base_logits[ORIGINAL:]) > 10 * max(2e-3, floor)
    if FORM[mt] == "yarn-fit":  # both outputs carry the same fit
        hf_fit = json.loads((m["hf_ext"] / "config.json").read_text())["rope_scaling"]
        meta = _meta(m["ext"])
        arch = meta["general.architecture"]
        assert meta[f"{arch}.rope.scaling.factor"] == pytest.approx(hf_fit["factor"], rel=1e-6)
        assert meta[f"{arch}.rope.scaling.original_context_length"] == hf_fit["original_max_position_embeddings"]
    if FORM[mt] == "rope_factors":  # both carry the same longrope factors
        import gguf

        hf_rope = json.loads((m["hf_ext"] / "config.json").read_text())["rope_scaling"]
        t = {x.name: np.asarray(x.data, dtype=np.float64) for x in gguf.GGUFReader(str(m["ext"])).tensors}
        assert t["rope_factors_long.weight"] == pytest.approx(hf_rope["long_factor"], rel=1e-6)
        assert t["rope_factors_short.weight"] == pytest.approx(hf_rope["short_factor"], rel=1e-6)


def test_perplexity_scores_the_documents_tokens_not_the_bos_the_file_adds(models, tmp_path):
    """A GGUF whose tokenizer adds BOS (tokenizer.ggml.add_bos_token, as Gemma's does) scores exactly the tokens of
    each document as the perplexity task counts them with the tokenizer rebuilt from the file; BOS is the first
    window's prefix, never a scored token (that extra token made a 32768-token document count 32769).  Control: the
    same file tokenises the text with one token more when asked for its special tokens."""
    import gguf
    from pydoc_data.topics import topics
    from transformers import AutoTokenizer

    from convert.evaluate.lmeval_gguf import GGUFLM
    from convert.formats.checkpoint import gguf_tokenizer_dir
    from convert.io.gguf_rewrite import rewrite_gguf
    from test_validate_gguf import _requests

    src = models["llama"]["ext"]  # a tokenizer the rebuilt one agrees with (smollm pre-tokenizer)
    bos = tmp_path / "bos.gguf"
    rewrite_gguf(src, bos, set_kv={"tokenizer.ggml.add_bos_token": (True, gguf.GGUFValueType.BOOL)}, progress=False)
    text = topics["assert"]
    tok = AutoTokenizer.from_pretrained(str(gguf_tokenizer_dir(bos)))
    counted = len(tok(text, add_special_tokens=False).input_ids)
    lm = GGUFLM(str(bos), max_length=TARGET)
    try:
        assert len(lm.tok_encode(text)) == counted + 1  # the file adds BOS by default
        lm.loglikelihood_rolling(_requests("loglikelihood_rolling", [(text,)]), True)
    finally:
        lm.close()
    assert len(lm.token_logprobs[0]) == counted


def _llama(path: Path, **kw):
    from convert.runtimes.llamacpp import import_llama_cpp

    return import_llama_cpp().Llama(str(path), n_ctx=TARGET, logits_all=False, verbose=False, n_threads=2,
                                    type_k=0, type_v=0, **kw)


def _logits(llm, ids: list[int]) -> np.ndarray:
    from convert.runtimes.llamacpp import Decoder

    d = Decoder(llm)
    try:
        return np.concatenate([r.copy() for _, r in d.decode(ids)])
    finally:
        d.close()
        llm.close()


@pytest.mark.parametrize("mt", [mt for mt in CONVERTED if FORM[mt] == "yarn-fit"])
def test_yarn_keys_are_llama_cpps_own_yarn(models, mt):
    """The written keys take effect as llama.cpp's own YaRN given the same numbers as context parameters."""
    meta = _meta(models[mt]["ext"])
    arch = meta["general.architecture"]
    f, L = meta[f"{arch}.rope.scaling.factor"], meta[f"{arch}.rope.scaling.original_context_length"]
    ids = _ids(ORIGINAL + 48, models[mt]["gguf"])
    got = _logits(_llama(models[mt]["ext"]), ids)
    own = _logits(_llama(models[mt]["gguf"], rope_scaling_type=2, rope_freq_scale=1.0 / f, yarn_orig_ctx=L), ids)
    assert max_abs_diff(got, own) < 1e-4


def test_uniform_factors_are_llama_cpps_linear_scaling(models, tmp_path):
    """rope_freqs.weight divides the angle, as the layout assumes: uniform factors s = llama.cpp's own linear
    scaling by s (rope_freq_scale 1/s)."""
    plan = make_plan("pi", TARGET)
    out = tmp_path / "pi.gguf"
    bake_gguf(models["llama"]["gguf"], out, plan, progress=False)
    ids = _ids(ORIGINAL + 48)
    got = _logits(_llama(out), ids)
    own = _logits(_llama(models["llama"]["gguf"], rope_freq_scale=1.0 / 4), ids)
    assert max_abs_diff(got, own) < 1e-4


def test_llama3_factors_compose(models):
    """A source that already carries rope_freqs (Llama 3.x): new factors = its factors x the extension's."""
    from convert.arch import rope_spec_from_gguf

    src = rope_spec_from_gguf(models["llama3"]["gguf"])
    assert src.rope_type == "rope_freqs" and max(src.gguf_factors) == pytest.approx(2.0)
    new = rope_spec_from_gguf(models["llama3"]["ext"])
    ratio = np.asarray(new.gguf_factors) / np.asarray(src.gguf_factors)
    report = json.loads((models["llama3"]["hf_ext"] / "dprope_factors.json").read_text())
    assert ratio == pytest.approx(report["factors"], rel=1e-5)


def test_cli_gguf_to_gguf_and_bad_input(models, tmp_path):
    src = models["qwen3"]["gguf"]
    res = CliRunner().invoke(main, ["extend", str(src), str(tmp_path / "o.gguf"), "--target-length", str(TARGET)])
    assert res.exit_code == 0, res.output
    assert "in place (yarn-fit)" in res.output and "YaRN fit" in res.output and "dprope.rope_form: yarn-fit" in res.output
    # a target no longer than the window, a truncated file, an existing output: one message, nothing left behind
    res = CliRunner().invoke(main, ["extend", str(src), str(tmp_path / "x.gguf"), "--target-length", str(ORIGINAL)])
    assert res.exit_code == 2 and "not longer than the model's window" in res.output
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(src.read_bytes()[: src.stat().st_size // 2])
    res = CliRunner().invoke(main, ["extend", str(cut), str(tmp_path / "y.gguf"), "--target-length", str(TARGET)])
    assert res.exit_code == 2 and "truncated" in res.output
    res = CliRunner().invoke(main, ["extend", str(src), str(tmp_path / "o.gguf"), "--target-length", str(TARGET)])
    assert res.exit_code == 2 and "already exists" in res.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cut.gguf", "o.gguf"]


def test_already_extended_output_composes_with_the_total_scale(models, tmp_path):
    """An output given back as a source: its factors are the base's, the new target is over its window."""
    twice = tmp_path / "twice.gguf"
    s = bake_gguf(models["llama"]["ext"], twice, make_plan(target_length=2 * TARGET), progress=False)
    assert s["original_length"] == TARGET and s["target_length"] == 2 * TARGET
    assert _meta(twice)["dprope.original_length"] == ORIGINAL  # the first window, kept through both extensions
    res = CliRunner().invoke(main, ["extend", str(models["llama"]["ext"]), str(tmp_path / "cli.gguf"),
                                    "--target-length", str(2 * TARGET)])
    assert res.exit_code == 0 and f"composing, {ORIGINAL} -> {2 * TARGET} in total (8x)" in res.output
    with pytest.raises(ConvertError, match="not longer than the model's window"):
        bake_gguf(models["llama"]["ext"], tmp_path / "no.gguf", make_plan(target_length=TARGET), progress=False)


def test_gguf_with_rope_keys_not_understood_is_refused(models, tmp_path):
    import gguf

    from convert.io.gguf_rewrite import rewrite_gguf

    odd = tmp_path / "odd.gguf"
    rewrite_gguf(models["qwen3"]["gguf"], odd, set_kv={"qwen3.rope.scaling.yarn_log_multiplier":
                                                       (0.1, gguf.GGUFValueType.FLOAT32)}, progress=False)
    with pytest.raises(ConvertError, match="rope keys this tool does not understand"):
        bake_gguf(odd, tmp_path / "o.gguf", make_plan(target_length=TARGET), progress=False)
    assert not (tmp_path / "o.gguf").exists()


@pytest.mark.parametrize("mt", ["llama3", "qwen2", "qwen3", "gemma3_text", "phi3"])
def test_verify_proves_an_in_place_gguf(models, mt, tmp_path):
    from convert.stages.verify import verify_gguf

    m = models[mt]
    s = bake_gguf(m["gguf"], tmp_path / "v.gguf", make_plan(target_length=TARGET), progress=False)
    rep = verify_gguf(tmp_path / "v.gguf", m["gguf"], factors=s["exact_factors"], temperature=s["temperature"])
    assert rep.ok, [(c.name, c.detail) for c in rep.failed()]
    # no llama.cpp context parameter stands for longrope factors: verify has no control of its own for that form
    own = set() if FORM[mt] == "rope_factors" else {"llama-cpp-own"}
    assert {c.name for c in rep.checks} == {"gguf-tensors", "gguf-metadata", "takes-effect"} | own
    assert (tmp_path / "v.gguf.verify.json").exists()
    # negative: the source given as the output changes nothing and states no extension
    bad = verify_gguf(m["gguf"], m["gguf"], write=False)
    assert {c.name for c in bad.failed()} >= {"gguf-metadata", "takes-effect"}


def test_recipe_in_place_never_dequantises_and_resumes(models, tmp_path, monkeypatch):
    import yaml

    import convert.formats.checkpoint as ck
    from convert.pipeline.run import run_recipe

    def no_detour(*a, **k):
        raise AssertionError("a GGUF extended in place must not be dequantised")

    monkeypatch.setattr(ck, "gguf_to_hf", no_detour)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({
        "name": "tiny-llama", "source": str(models["llama"]["gguf"]), "target_length": TARGET,
        "export": {"in_place": True, "gguf": []},
        "validate": {"outputs": ["in-place"], "tasks": ["ppl"], "lengths": [2 * ORIGINAL], "limit": 1}}))
    run = tmp_path / "run"
    s = run_recipe(recipe, run, echo=lambda *_: None)
    assert s["stages"]["bake"].startswith("skip (export.in_place") and s["stages"]["verify"] == "run"
    out = run / "export" / "tiny-llama-in-place.gguf"
    assert out.exists() and not (run / "hf").exists()
    assert json.loads((run / "verify.json").read_text())["ok"]
    manifest = json.loads((run / "export" / "manifest.json").read_text())
    assert manifest["checkpoint"] is None and manifest["gguf"][0]["rope_form"] == "rope_freqs"
    assert (run / "validation" / "in-place" / "validation.md").exists()
    again = run_recipe(recipe, run, echo=lambda *_: None)
    assert all(a.startswith("skip") for a in again["stages"].values()), again["stages"]


def test_in_place_recipe_errors_are_reported_at_once(models, tmp_path):
    from convert.pipeline.recipe import load_recipe

    import yaml

    recipe = tmp_path / "bad.yaml"
    recipe.write_text(yaml.safe_dump({
        "name": "bad", "source": "some/dir", "target_length": TARGET, "export": {"in_place": True},
        "train": {"data": "x.txt", "seq_len": 64, "steps": 1}, "validate": {"outputs": ["hf", "in-place"]}}))
    with pytest.raises(ConvertError) as e:
        load_recipe(recipe)
    for part in ("is not one", "no hf/ checkpoint to train", "export.gguf must be []", "outputs: [in-place]"):
        assert part in str(e.value)
