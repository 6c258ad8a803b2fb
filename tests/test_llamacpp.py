"""convert.runtimes.llamacpp, the one module that drives llama-cpp-python below its Llama class, pinned to the installed
version: its logits are Llama.eval's, it hands back only the rows asked for, and llama.cpp's log lines reach
Python logging only while asked."""

import logging

import numpy as np
import pytest

from convert.errors import ConvertError
from convert.formats.gguf_export import export_gguf
from convert.runtimes.llamacpp import Decoder, LlamaCppOptions, log_softmax_at, native_logs, open_llama

pytestmark = pytest.mark.runtime
N = 150


@pytest.fixture(scope="module")
def f32_gguf(tiny_models, tmp_path_factory):
    return export_gguf(tiny_models[("llama", False)], tmp_path_factory.mktemp("lc") / "m.gguf", "f32",
                       progress=False)


def _ids(n=N, seed=0):
    return np.random.default_rng(seed).integers(3, 500, n).tolist()


def test_decoder_logits_equal_llama_eval(f32_gguf):
    from convert.runtimes.llamacpp import import_llama_cpp

    llama_cpp = import_llama_cpp()

    ids = _ids()
    ref_llm = llama_cpp.Llama(str(f32_gguf), n_ctx=256, logits_all=True, verbose=False, type_k=0, type_v=0)
    try:
        ref_llm.eval(ids)
        ref = np.array(ref_llm.scores[:N], dtype=np.float32)
    finally:
        ref_llm.close()
    llm = open_llama(f32_gguf, 256, LlamaCppOptions(kv_cache="f32", n_batch=64))  # three batches
    d = Decoder(llm)
    try:
        got = np.concatenate([r.copy() for _, r in d.decode(ids)])
        assert got.shape == ref.shape and np.abs(got - ref).max() < 1e-5
        # only the rows asked for come back, with their indices, and equal the full run's
        want = np.zeros(N, dtype=bool)
        want[[0, 5, 63, 64, 100, N - 1]] = True
        d.clear()
        parts = [(i.copy(), r.copy()) for i, r in d.decode(ids, 0, want)]
        idx = np.concatenate([i for i, _ in parts])
        assert idx.tolist() == [0, 5, 63, 64, 100, N - 1]
        assert np.abs(np.concatenate([r for _, r in parts]) - ref[idx]).max() < 1e-5
        assert sum(len(r) for _, r in parts) == 6  # no batch hands back rows nobody asked for
        # clear() forgets the cache: the same sequence again gives the same logits
        d.clear()
        again = np.concatenate([r.copy() for _, r in d.decode(ids)])
        assert np.abs(again - got).max() < 1e-6
        with pytest.raises(ConvertError, match="do not fit the context of 256"):
            list(d.decode(ids, start=200))
    finally:
        d.close()
        llm.close()


def test_log_softmax_at_matches_the_definition():
    rng = np.random.default_rng(1)
    logits = (rng.standard_normal((7, 300)) * 8).astype(np.float32)
    tgt = rng.integers(0, 300, 7)
    tgt[2] = int(np.argmax(logits[2]))
    lp, greedy = log_softmax_at(logits, tgt)
    x = logits.astype(np.float64)
    ref = x[np.arange(7), tgt] - np.log(np.exp(x - x.max(1, keepdims=True)).sum(1)) - x.max(1)
    assert np.abs(lp - ref).max() < 1e-5
    assert greedy.tolist() == (tgt == logits.argmax(1)).tolist() and greedy[2]


def test_native_log_lines_reach_python_logging_only_inside_the_block(f32_gguf, caplog):
    from convert.runtimes.llamacpp import import_llama_cpp

    llama_cpp = import_llama_cpp()

    caplog.set_level(logging.DEBUG, logger="llama.cpp")
    with native_logs():
        llama_cpp.Llama(str(f32_gguf), n_ctx=64, verbose=False).close()
    inside = [r for r in caplog.records if r.name == "llama.cpp"]
    assert inside and any("llama" in r.getMessage() for r in inside)
    caplog.clear()
    llama_cpp.Llama(str(f32_gguf), n_ctx=64, verbose=False).close()  # llama-cpp-python's own callback is back
    assert not [r for r in caplog.records if r.name == "llama.cpp"]


def test_bad_files_are_refused_naming_the_problem(f32_gguf, tmp_path):
    data = f32_gguf.read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[: len(data) * 2 // 3])
    with pytest.raises(ConvertError, match="cut.gguf ends inside tensor .*truncated"):
        open_llama(cut, 64)
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"not a model at all, just some bytes")
    with pytest.raises(ConvertError, match="not a GGUF file"):
        open_llama(junk, 64)
    with pytest.raises(ConvertError, match="KV cache type 'q4' is not offered"):
        LlamaCppOptions(kv_cache="q4")


@pytest.mark.parametrize("flash_attn", [False, True])
def test_a_kept_prefix_is_not_decoded_again_and_changes_no_number(f32_gguf, flash_attn):
    """Decoder.reuse keeps the cached prefix two sequences share (cut to a multiple of n_ubatch) and forgets the rest;
    the rows decoded after it equal a decode from an empty cache bit for bit, with the fused attention (whose sums
    depend on how a ubatch's rows are tiled) as without it."""
    a, b = _ids(), _ids()
    b[100:] = _ids(N - 100, seed=1)  # shares its first 100 tokens with a
    opts = LlamaCppOptions(kv_cache="f16", flash_attn=flash_attn, n_ubatch=16)
    llm = open_llama(f32_gguf, 256, opts)
    d = Decoder(llm)
    try:
        d.clear()
        fresh = np.concatenate([r.copy() for _, r in d.decode(b)])
        assert d.n_calls == N // 16 + 1  # all rows asked for: n_ubatch rows per call
        d.clear()
        list(d.decode(a, 0, np.zeros(N, dtype=bool)))
        assert d.held == a
        before = d.n_decoded
        k = d.reuse(b)
        assert k == 96 and d.held == a[:96]  # 100 shared, cut to 6 ubatches of 16
        got = np.concatenate([r.copy() for _, r in d.decode(b[k:], k)])
        assert d.n_decoded - before == N - 96 and d.held == b
        assert np.array_equal(got, fresh[96:])
        # the whole sequence again: all of it is kept but the last ubatch, at most `most` tokens
        assert d.reuse(b, most=N - 1) == (N - 1) // 16 * 16
        # a failed decode (llama.cpp refuses a gap after cached positions) leaves the cache's contents unknown:
        # nothing is kept then, and the memory is cleared
        with pytest.raises(ConvertError, match="llama_decode returned"):
            list(d.decode([5], 200))
        assert d.held is None and d.reuse(b) == 0 and d.held == []
        assert np.array_equal(np.concatenate([r.copy() for _, r in d.decode(b)]), fresh)
    finally:
        d.close()
        llm.close()


def test_a_prompt_goes_in_one_call_with_only_its_last_row(f32_gguf):
    llm = open_llama(f32_gguf, 256, LlamaCppOptions(kv_cache="f32", n_ubatch=16))
    d = Decoder(llm)
    try:
        assert d.n_batch == 256 and d.n_ubatch == 16  # n_batch defaults to the context
        last = np.zeros(N, dtype=bool)
        last[-1] = True
        d.clear()
        parts = [(i.copy(), r.copy()) for i, r in d.decode(_ids(), 0, last)]
        assert d.n_calls == 1 and [i.tolist() for i, _ in parts] == [[N - 1]] and parts[0][1].shape == (1, 512)
        # rows asked for anywhere: calls cut at ubatch edges, never more than n_ubatch rows at once
        some = np.zeros(N, dtype=bool)
        some[[3, 40, 41, 42, 149]] = True
        some[60:100] = True
        d.clear()
        parts = [(i.copy(), r.copy()) for i, r in d.decode(_ids(), 0, some)]
        sizes = [len(i) for i, _ in parts]
        assert sum(sizes) == int(some.sum()) and max(sizes) <= 16
        assert d.n_outputs == 1 + int(some.sum()) and d.peak_outputs == 16  # the rows asked for, counted
        # a smaller slice than a ubatch (max_rows): a ubatch with more rows is cut after its 5th, the same rows (the
        # unfused attention of the f32 cache does not depend on where calls are cut)
        small = Decoder(llm, max_rows=5)
        small.clear()
        got = [(i.copy(), r.copy()) for i, r in small.decode(_ids(), 0, some)]
        # rows 3, 40-42 | 60-63 | 64-78 in threes of 5 | 79 | 80-94 in threes of 5 | 95 with 96-99 | 149
        assert [len(i) for i, _ in got] == [4, 4, 5, 5, 5, 1, 5, 5, 5, 5, 1]
        assert small.peak_outputs == 5 and small.n_outputs == int(some.sum()) and small.n_decoded == N
        assert np.array_equal(np.concatenate([i for i, _ in got]), np.flatnonzero(some))
        assert np.abs(np.concatenate([r for _, r in got]) - np.concatenate([r for _, r in parts])).max() < 1e-5
        small.close()
    finally:
        d.close()
        llm.close()


def test_a_large_vocabulary_runs_in_smaller_ubatches_so_a_slice_of_logits_stays_bounded(f32_gguf):
    """n_ubatch x n_vocab x 4 bytes stays within LlamaCppOptions.logit_bytes (256 MiB): unchanged for vocabularies
    up to 131,072 tokens at n_ubatch 512, the largest power of two that fits above that (Gemma 3's 262,144: 256)."""
    from convert.runtimes.llamacpp import LOGIT_BYTES, logit_rows

    assert LOGIT_BYTES == 256 << 20
    assert logit_rows(49152, 512) == 512 and logit_rows(128256, 512) == 512  # SmolLM2, Llama 3
    assert logit_rows(262144, 512) == 256 and logit_rows(151936, 512) == 256  # Gemma 3, Qwen2.5
    assert logit_rows(262144, 2048) == 256 and logit_rows(262144, 100) == 100 and logit_rows(262144, 512, None) == 512
    assert logit_rows(10**9, 512) == 1
    opts = LlamaCppOptions(kv_cache="f32", n_ubatch=16, logit_bytes=6 * 512 * 4)  # 6 rows of the tiny vocabulary
    assert opts.for_vocab(512).n_ubatch == 4 == opts.for_vocab(512).for_vocab(512).n_ubatch
    assert opts.for_vocab(512).key() == {**opts.key(), "n_ubatch": 4}
    llm = open_llama(f32_gguf, 256, opts)
    d = Decoder(llm)
    try:
        assert d.n_ubatch == d.max_rows == 4 and d.n_ubatch * d.n_vocab * 4 <= opts.logit_bytes
        assert len(list(d.decode(_ids()))) == -(-N // 4) and d.peak_outputs == 4
    finally:
        d.close()
        llm.close()
    with pytest.raises(ConvertError, match="logit_bytes"):
        LlamaCppOptions(logit_bytes=0)


def test_options_flash_attention_follows_the_cache_type_and_batch_sizes_are_part_of_the_key():
    assert LlamaCppOptions().flash_attn is True and LlamaCppOptions(kv_cache="f32").flash_attn is False
    assert LlamaCppOptions(kv_cache="f32", flash_attn=True).flash_attn is True
    key = LlamaCppOptions(n_threads=3).key()
    assert key == {"kv_cache": "f16", "flash_attn": True, "n_batch": None, "n_ubatch": 512}
    with pytest.raises(ConvertError, match="must be positive"):
        LlamaCppOptions(n_ubatch=0)


def test_a_build_with_amx_loads_models_without_its_extra_buffers(monkeypatch):
    """llama.cpp's AMX weight buffers crash on some AMX CPUs (ggml-org/llama.cpp#20824): where the build reports
    AMX_INT8, models load with the extra buffer types off; elsewhere llama.cpp's defaults stay."""
    from convert.runtimes.llamacpp import import_llama_cpp

    monkeypatch.delenv("DPROPE_LLAMA_EXTRA_BUFFERS", raising=False)
    llama_cpp = import_llama_cpp()
    amx = "AMX_INT8 = 1" in llama_cpp.llama_print_system_info().decode(errors="replace")
    assert llama_cpp.llama_cpp.llama_model_default_params().use_extra_bufts is (not amx)


def test_contexts_keep_every_position_of_a_sliding_window_model(f32_gguf, monkeypatch):
    """llama.cpp's smaller sliding-window cache (n_swa + n_ubatch cells, its command-line tools' default) changes
    Gemma 3's logits from the third ubatch past the window on; the contexts opened here hold every position
    (``swa_full``), set explicitly rather than left to the binding's default (here made the smaller one)."""
    from convert.runtimes.llamacpp import import_llama_cpp

    low = import_llama_cpp().llama_cpp
    default = low.llama_context_default_params

    def smaller():
        p = default()
        p.swa_full = False
        return p

    monkeypatch.setattr(low, "llama_context_default_params", smaller)
    llm = open_llama(f32_gguf, 256, LlamaCppOptions(kv_cache="f32", n_ubatch=32))
    try:
        assert llm.context_params.swa_full is True
    finally:
        llm.close()
