"""bench/validate_speed.py's pieces on a tiny GGUF: ours scores exactly the tokens llama-perplexity scores, its output
is read to six decimals, and, where the benchmark has built llama-perplexity already, the two agree."""

import subprocess

import numpy as np
import pytest

from convert.formats.gguf_export import export_gguf

pytestmark = [pytest.mark.runtime, pytest.mark.bench]


@pytest.fixture(scope="module")
def tiny_gguf(tiny_models, tmp_path_factory):
    return export_gguf(tiny_models[("llama", False)], tmp_path_factory.mktemp("vs") / "m.gguf", "f32",
                       progress=False)


def _text():
    from pydoc_data.topics import topics

    return topics["assert"] + topics["for"] + topics["if"]


def test_ours_scores_the_second_half_like_llama_perplexity(tiny_gguf):
    """scored_tokens picks llama-perplexity's tokens (positions n/2+1 .. n-1 of the first chunk); scoring only them
    gives the same log-probabilities as scoring the whole window and keeping those positions."""
    import validate_speed as V

    from convert.evaluate.lmeval_gguf import GGUFModel
    from convert.runtimes.llamacpp import LlamaCppOptions

    n = 64
    with GGUFModel(tiny_gguf, n, LlamaCppOptions(n_ubatch=16)) as m:
        ids = m.llm.tokenize(_text().encode(), add_bos=True, special=False)
        inputs, targets = V.scored_tokens(ids, n)
        assert inputs == ids[: n - 1] and targets == ids[n // 2 + 1 : n] and len(targets) == n - n // 2 - 1
        half, _ = m.score(inputs, targets)
        whole, _ = m.score(inputs, ids[1:n])
        assert np.array_equal(half, whole[n // 2 :])
        with pytest.raises(SystemExit, match="needs 2 x"):
            V.scored_tokens(ids[: 2 * n - 1], n)


def test_the_peers_command_and_output():
    from pathlib import Path

    import validate_speed as V

    s = {"threads": 2, "n_ubatch": 256, "peer_batch": 2048, "kv_cache": "f16", "flash_attn": True}
    cmd = V.peer_command(Path("/x/llama-perplexity"), Path("m.gguf"), Path("t.txt"), 4096, s)
    # a sliding-window model's cache holds every position, as in llama-cpp-python (convert/runtimes/llamacpp.py)
    assert cmd[-1] == "--swa-full"
    cmd = cmd[:-1]
    flags = dict(zip(cmd[1::2], cmd[2::2]))
    assert flags == {"-m": "m.gguf", "-f": "t.txt", "-c": "4096", "--chunks": "1", "-b": "2048", "-ub": "256",
                     "-t": "2", "-tb": "2", "-fa": "on", "-ctk": "f16", "-ctv": "f16", "--ppl-output-type": "1"}
    out = ("perplexity: 15.17 seconds per pass - ETA 0.25 minutes\n"
           "       0  11.8531  2.472492  0.025331\n\nFinal estimate: PPL = 11.8531 +/- 0.30023\n")
    assert V.parse_peer(out) == {"mean_nll": 2.472492, "perplexity": 11.8531, "compute_s": 15.17}
    with pytest.raises(RuntimeError, match="no perplexity line"):
        V.parse_peer("error: you need at least 8192 tokens")
    # on a CPU where llama-cpp-python loads models without extra (AMX) buffers, the peer runs that way too
    assert "--no-repack" not in cmd
    assert V.peer_command(Path("/x/llama-perplexity"), Path("m.gguf"), Path("t.txt"), 4096,
                          {**s, "no_repack": True})[-2:] == ["--no-repack", "--swa-full"]


def test_ours_agrees_with_a_built_llama_perplexity(tiny_gguf, tmp_path):
    """Only where the benchmark has built llama-perplexity (bench/.data/llama-perplexity/<version>/)."""
    import validate_speed as V

    from convert.evaluate.lmeval_gguf import GGUFModel
    from convert.runtimes.llamacpp import extra_buffers_off

    exe = V.DATA / "llama-perplexity" / V.llama_cpp_python_version() / "build" / "bin" / "llama-perplexity"
    if not exe.is_file():
        pytest.skip("llama-perplexity is not built (python bench/validate_speed.py builds it)")
    n = 128
    text = tmp_path / "t.txt"
    text.write_text(_text())
    s = {"threads": 2, "n_ubatch": 32, "peer_batch": 64, "kv_cache": "f16", "flash_attn": True,
         "no_repack": extra_buffers_off()}
    p = subprocess.run(V.peer_command(exe, tiny_gguf, text, n, s), capture_output=True, text=True,
                       env=V.peer_env(exe), timeout=300)
    assert p.returncode == 0, (p.stdout + p.stderr)[-2000:]
    peer = V.parse_peer(p.stdout + p.stderr)
    with GGUFModel(tiny_gguf, n, V.gguf_options(s)) as m:
        ids = m.llm.tokenize(_text().encode(), add_bos=True, special=False)  # as llama-perplexity does
        lp, _ = m.score(*V.scored_tokens(ids, n))
    assert float(-lp.astype(np.float64).mean()) == pytest.approx(peer["mean_nll"], abs=2e-6)


def test_the_report_states_each_target_met_or_missed():
    import validate_speed as V

    s = {"threads": 2, "n_ubatch": 512, "peer_batch": 2048, "kv_cache": "f16", "flash_attn": True}
    base = {"task": "ppl", "wall_s": 1.0, "cpu_s": 1.0, "peak_rss_mb": 1.0, "tokens": 10}
    rows = [{**base, "path": "hf", "score_s": 100.0, "perplexity": 10.0},
            {**base, "path": "ours", "score_s": 110.0, "perplexity": 10.1},
            {**base, "path": "peer-ppl", "score_s": 100.0, "perplexity": 10.1}]
    text = V.report(1024, 4096, rows, s, "cmd")
    assert "ours / transformers 1.10x (<= 1.0x: MISSED); ours / the peer 1.10x (<= 1.2x: met)" in text
    assert "relative difference 0.0e+00" in text and "agree" in text
    rows[1]["score_s"], rows[1]["perplexity"] = 90.0, 10.5
    text = V.report(1024, 4096, rows, s, "cmd")
    assert "ours / transformers 0.90x (<= 1.0x: met)" in text and "DISAGREE" in text


def test_another_gguf_its_text_the_peers_memory_and_the_report(tiny_gguf, tmp_path):
    """--gguf/--model: the corpus file every path reads is repeated until it has the 2 x length tokens
    llama-perplexity needs (the first window unchanged); the peer's logits are sized before it runs (Gemma 3 at 48k:
    ~28 GB, skipped where they do not fit, and the report says so); ours reports the rows it asked for."""
    import validate_speed as V

    from convert.runtimes.llamacpp import open_llama

    assert V.MODELS["gemma3"].name == "gemma-3-270m-Q4_K_M.gguf"
    assert V.peer_memory_bytes(49152, 262144, 2048) == (24576 + 2048) * 262144 * 4  # 27.9 GB
    assert V.peer_memory_bytes(32768, 49152, 2048) == (16384 + 2048) * 49152 * 4  # SmolLM2 at 32k: 3.6 GB
    vocab = open_llama(tiny_gguf, 64, vocab_only=True)
    try:
        one = V.corpus_file(tiny_gguf, [64], tmp_path / "one.txt")
        first = V.corpus_ids(vocab, one)
        n = len(first)
        two = V.corpus_file(tiny_gguf, [n - 8], tmp_path / "two.txt")
        ids = V.corpus_ids(vocab, two)
    finally:
        vocab.close()
    assert len(ids) >= 2 * (n - 8) and two.read_text().startswith(one.read_text() + "\n\n")
    assert ids[: n - 8] == first[: n - 8]  # the window scored lies in the first copy
    with pytest.raises(SystemExit, match="shorter than one"):
        V.corpus_file(tiny_gguf, [10 * n], tmp_path / "three.txt")

    s = {"threads": 2, "n_ubatch": 256, "peer_batch": 2048, "kv_cache": "f16", "flash_attn": True}
    ours = {"task": "ppl", "path": "ours", "wall_s": 1.0, "cpu_s": 1.0, "peak_rss_mb": 1.0, "tokens": 24575,
            "score_s": 10.0, "perplexity": 7.0, "rows_out": 24575, "peak_rows": 256, "n_vocab": 262144,
            "llama_decode_calls": 99}
    text = V.report(49152, 0, [ours], s, "cmd", "`gemma-3-270m-Q4_K_M.gguf`", ["llama-perplexity not run at 49152"])
    assert "`gemma-3-270m-Q4_K_M.gguf`; llama.cpp: 2 threads, n_ubatch 256" in text and "SmolLM2" not in text
    assert "llama-perplexity not run at 49152" in text
    assert "24575 rows of logits (the 24575 scored tokens), at most 256 per llama_decode call" in text
    assert "256 x 262144 x 4 bytes = 256 MiB" in text
