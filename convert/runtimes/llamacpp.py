"""The one place that drives llama-cpp-python below its ``Llama`` class: decoding a batch with chosen output rows,
clearing the context's memory, and routing llama.cpp's own log lines into Python logging.

``Llama.eval`` asks llama.cpp for the logits of every position only when the model was created with
``logits_all=True``, and then keeps them all in ``Llama.scores``, an ``n_ctx x n_vocab`` float32 array (6.4 GB at
32k tokens and a 49k vocabulary; abetlen/llama-cpp-python ``llama_cpp/llama.py``, ``Llama.__init__`` and
``Llama.eval``).  Here a model is created with ``logits_all=False`` and batches are decoded through llama.cpp's C
API (``llama_batch_init``, ``llama_decode``, ``llama_get_logits``, ``llama_memory_clear``: ggml-org/llama.cpp
``include/llama.h``, bound one to one in ``llama_cpp/llama_cpp.py``), asking for the rows a caller needs, so at
most ``n_batch`` rows of logits exist at a time.  Everything else (loading, tokenising, detokenising) uses
``Llama``'s public methods.  ``tests/test_llamacpp.py`` pins this module to the installed llama-cpp-python: its
logits equal ``Llama.eval``'s with ``logits_all=True``.
"""

from __future__ import annotations

import collections
import contextlib
import ctypes
import logging
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator, Literal, Sequence

import numpy as np

from convert.compat import llama_cpp_log_callback
from convert.errors import ConvertError
from convert.runtimes.base import Runtime, register_runtime

log = logging.getLogger(__name__)
NATIVE = logging.getLogger("llama.cpp")  # llama.cpp's own log lines (its stderr output otherwise)

# ggml_type ids of the KV cache types offered (ggml-org/llama.cpp ggml/include/ggml.h: GGML_TYPE_F32 = 0, F16 = 1)
KV_TYPES = {"f32": 0, "f16": 1}
# enum ggml_log_level -> logging level, as ggml-org/llama.cpp ggml/include/ggml.h numbers it today (NONE 0, DEBUG 1,
# INFO 2, WARN 3, ERROR 4, CONT 5 = continues the previous line).  llama_cpp/_logger.py still maps the older order
# (2 -> WARNING, 3 -> ERROR, 4 -> DEBUG), so with verbose=False it prints warnings and hides errors.
_LEVELS = {0: logging.INFO, 1: logging.DEBUG, 2: logging.INFO, 3: logging.WARNING, 4: logging.ERROR}


def import_llama_cpp():
    try:
        import llama_cpp
    except ImportError:
        raise ConvertError(
            "llama-cpp-python is not installed: `pip install 'dprope[llama]'` (it compiles llama.cpp; "
            "CMAKE_ARGS='-DLLAVA_BUILD=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_EXAMPLES=OFF' keeps it short)"
        ) from None
    return llama_cpp


@dataclass(frozen=True)
class LlamaCppOptions:
    """How a GGUF is run.  ``kv_cache``: f16 is llama-cpp-python's default (what its users get); f32 keeps
    the cache exact, so an f32 GGUF gives transformers' numbers up to float32 summation order.  ``flash_attn``:
    llama.cpp's CPU flash attention rounds K and V to f16 whatever the cache type."""

    kv_cache: Literal["f16", "f32"] = "f16"
    flash_attn: bool = False
    n_batch: int = 512  # tokens per llama_decode call, and so the most rows of logits held at once
    n_threads: int | None = None  # default: every core

    def __post_init__(self):
        if self.kv_cache not in KV_TYPES:
            raise ConvertError(f"KV cache type '{self.kv_cache}' is not offered; choose {', '.join(KV_TYPES)}")

    def key(self) -> dict:
        """What changes the numbers (thread count does not: ggml splits rows, not sums, across threads)."""
        d = asdict(self)
        d.pop("n_threads")
        return d


def gguf_context_length(path: Path) -> int:
    """The ``<arch>.context_length`` a GGUF declares (the header is checked whole first)."""
    from convert.io.gguf_meta import read_gguf

    meta = read_gguf(Path(path)).meta
    arch = meta.get("general.architecture")
    n = meta.get(f"{arch}.context_length")
    if not n:
        raise ConvertError(f"{path} has no {arch}.context_length; re-export it (dprope export-gguf)")
    return int(n)


class _NativeLog:
    """llama.cpp log lines -> the ``llama.cpp`` logger, keeping the last warnings and errors for messages."""

    def __init__(self):
        self.recent: collections.deque[str] = collections.deque(maxlen=8)
        self.level = logging.INFO
        self.depth = 0
        self.callback = None

    def __call__(self, level: int, text: bytes, _user) -> None:
        if level != 5:
            self.level = _LEVELS.get(level, logging.INFO)
        line = text.decode("utf-8", errors="replace").rstrip()
        if line:
            NATIVE.log(self.level, "%s", line)
            if self.level >= logging.WARNING:
                self.recent.append(line)


_NATIVE_LOG = _NativeLog()


@contextlib.contextmanager
def native_logs() -> Iterator[_NativeLog]:
    """For the duration of the block llama.cpp logs to the ``llama.cpp`` Python logger instead of stderr;
    llama-cpp-python's own callback is put back afterwards (it installs it at import:
    ``convert.compat.llama_cpp_log_callback``)."""
    llama_cpp = import_llama_cpp()
    own_callback = llama_cpp_log_callback()

    nl = _NATIVE_LOG
    if nl.depth == 0:
        nl.callback = llama_cpp.llama_log_callback(nl)  # kept referenced while installed
        llama_cpp.llama_log_set(nl.callback, ctypes.c_void_p(0))
    nl.depth += 1
    try:
        yield nl
    finally:
        nl.depth -= 1
        if nl.depth == 0:
            llama_cpp.llama_log_set(own_callback, ctypes.c_void_p(0))
            nl.callback = None


def open_llama(path: Path, n_ctx: int, options: LlamaCppOptions = LlamaCppOptions(), vocab_only: bool = False):
    """A ``Llama`` with ``logits_all=False`` and context ``n_ctx``.  The file's header and tensor extents are
    checked first, so a truncated or foreign file is refused naming the problem, not llama.cpp's 'failed to load'."""
    from convert.io.gguf_meta import read_gguf

    path = Path(path)
    if not path.is_file():
        raise ConvertError(f"{path} does not exist: pass a .gguf model file")
    read_gguf(path)
    llama_cpp = import_llama_cpp()
    threads = options.n_threads or max(1, os.cpu_count() or 1)
    kw = dict(n_ctx=int(n_ctx), n_batch=min(int(n_ctx), options.n_batch), logits_all=False, verbose=False,
              vocab_only=vocab_only, n_threads=threads, n_threads_batch=threads, flash_attn=options.flash_attn,
              type_k=KV_TYPES[options.kv_cache], type_v=KV_TYPES[options.kv_cache])
    with native_logs() as nl:
        nl.recent.clear()
        try:
            return llama_cpp.Llama(str(path), **kw)
        except ValueError as e:
            said = "; ".join(nl.recent) or str(e)
            raise ConvertError(f"llama.cpp could not load {path}: {said}. Re-export the file (dprope export-gguf) "
                               "or update llama-cpp-python") from None


class Decoder:
    """Decodes one sequence (seq 0) into a ``Llama`` context, returning the logits of the rows asked for."""

    def __init__(self, llm):
        self.llama_cpp = import_llama_cpp()
        self.llm = llm
        self.n_batch = int(llm.n_batch)
        self.n_ctx = int(llm.n_ctx())
        self.n_vocab = int(llm.n_vocab())
        self._batch = self.llama_cpp.llama_batch_init(self.n_batch, 0, 1)

    def close(self) -> None:
        if self._batch is not None:
            self.llama_cpp.llama_batch_free(self._batch)
            self._batch = None

    def __del__(self):
        with contextlib.suppress(Exception):
            self.close()

    def is_eog(self, token: int) -> bool:
        """An end-of-generation token (EOS, EOT, ...) by the GGUF's vocabulary."""
        lc = self.llama_cpp
        return bool(lc.llama_vocab_is_eog(lc.llama_model_get_vocab(self.llm.model), int(token)))

    def clear(self) -> None:
        """Forget every cached position (the next decode may start at any position)."""
        mem = self.llama_cpp.llama_get_memory(self.llm.ctx)
        if mem is not None:
            self.llama_cpp.llama_memory_clear(mem, True)

    def decode(self, tokens: Sequence[int], start: int = 0, outputs: Sequence[bool] | None = None
               ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Decode ``tokens`` at positions start.. after what is cached, ``n_batch`` at a time.  Yields, per batch
        that has any, (indices into ``tokens``, logits [k, n_vocab] float32) for the tokens whose ``outputs`` flag
        is set (default: all).  The logits array is llama.cpp's own buffer: valid until the next decode."""
        lc, b = self.llama_cpp, self._batch
        if b is None:
            raise ConvertError("this decoder was closed")
        n = len(tokens)
        if start + n > self.n_ctx:
            raise ConvertError(f"positions up to {start + n} do not fit the context of {self.n_ctx} tokens; "
                               "load the model with a larger n_ctx")
        flags = np.ones(n, dtype=bool) if outputs is None else np.asarray(outputs, dtype=bool)
        for s in range(0, n, self.n_batch):
            chunk = tokens[s : s + self.n_batch]
            want = flags[s : s + len(chunk)]
            b.n_tokens = len(chunk)
            for i, t in enumerate(chunk):
                b.token[i] = int(t)
                b.pos[i] = start + s + i
                b.n_seq_id[i] = 1
                b.seq_id[i][0] = 0
                b.logits[i] = int(want[i])
            rc = lc.llama_decode(self.llm.ctx, b)
            if rc != 0:
                raise ConvertError(f"llama_decode returned {rc} at positions {start + s}..{start + s + len(chunk)} "
                                   f"(context {self.n_ctx}): " + ("no free slot in the KV cache" if rc == 1 else
                                                                "see the log file"))
            k = int(want.sum())
            if k:
                rows = np.ctypeslib.as_array(lc.llama_get_logits(self.llm.ctx), shape=(k * self.n_vocab,))
                yield np.flatnonzero(want) + s, rows.reshape(k, self.n_vocab)


def log_softmax_at(logits: np.ndarray, targets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """log p(targets[j]) under softmax(logits[j]) (float32 [k]) and whether each target is the argmax
    (bool [k]); ``logits`` [k, vocab]."""
    m = logits.max(axis=1)
    picked = logits[np.arange(len(targets)), targets]
    tmp = np.subtract(logits, m[:, None])  # one [k, vocab] temporary, exponentiated in place
    np.exp(tmp, out=tmp)
    lse = m.astype(np.float64) + np.log(tmp.sum(axis=1, dtype=np.float64))
    return (picked - lse).astype(np.float32), picked >= m


@contextlib.contextmanager
def open_gguf(path: Path, n_ctx: int, *, f32_kv: bool = True, vocab_only: bool = False) -> Iterator:
    """:func:`open_llama` as a context manager, by default with an F32 KV cache (so parity is not limited by cache
    rounding); the model is closed on exit."""
    llm = open_llama(path, n_ctx, LlamaCppOptions(kv_cache="f32" if f32_kv else "f16"), vocab_only=vocab_only)
    try:
        yield llm
    finally:
        llm.close()


def llama_cpp_tokenize(path: Path, text: str) -> list[int]:
    """Token ids without BOS; special tokens written in the text are parsed as such, as transformers does."""
    with open_gguf(path, 64, vocab_only=True) as llm:
        return llm.tokenize(text.encode("utf-8"), add_bos=False, special=True)


def llama_cpp_logits(path: Path, token_ids: Sequence[int], n_ctx: int, start_pos: int = 0
                     ) -> tuple[np.ndarray, int]:
    """Logits [n_tokens, vocab] (float32) for one sequence placed at positions start_pos.., and the context
    llama.cpp actually allocated.  A start past the original window checks rotations at large positions without
    paying for a prefix (llama.cpp accepts any first position on an empty cache)."""
    with LlamaCppRuntime(path, n_ctx) as rt:
        return rt.logits(token_ids, start_pos), rt.n_ctx


@register_runtime
class LlamaCppRuntime(Runtime):
    """A GGUF in llama.cpp (llama-cpp-python), one sequence, logits only for the rows asked for."""

    name = "llama.cpp"
    formats = ("gguf",)
    reads = ("<arch>.context_length", "<arch>.rope.freq_base", "<arch>.rope.dimension_count",
             "<arch>.rope.scaling.type", "<arch>.rope.scaling.factor", "<arch>.rope.scaling.original_context_length",
             "<arch>.rope.scaling.attn_factor", "rope_freqs.weight (arch llama)",
             "rope_factors_long.weight / rope_factors_short.weight (rope.scaling.type longrope)")
    source = "ggml-org/llama.cpp: src/llama-model.cpp (llama_model::load_hparams), src/models/<arch>.cpp"

    def __init__(self, path: Path, n_ctx: int | None = None, options: LlamaCppOptions | None = None):
        super().__init__(path)
        self.llm = open_llama(path, int(n_ctx or gguf_context_length(path)), options or LlamaCppOptions("f32"))
        self.decoder = Decoder(self.llm)
        self.n_ctx = int(self.llm.n_ctx())

    def logits(self, token_ids: Sequence[int], start_pos: int = 0) -> np.ndarray:
        self.decoder.clear()
        ids = list(map(int, token_ids))
        rows = [r.copy() for _, r in self.decoder.decode(ids, start_pos)]
        return np.concatenate(rows).astype(np.float32)

    def generate(self, token_ids: Sequence[int], max_new_tokens: int) -> list[int]:
        """Greedy: the prompt in n_batch-token batches with only its last row of logits, then one token a step."""
        self.decoder.clear()
        ids = list(map(int, token_ids))
        flags = [False] * (len(ids) - 1) + [True]
        last = None
        for _, rows in self.decoder.decode(ids, 0, flags):
            last = rows[-1]
        out: list[int] = []
        pos = len(ids)
        while last is not None and len(out) < int(max_new_tokens):
            tok = int(np.argmax(last))
            if self.decoder.is_eog(tok):
                break
            out.append(tok)
            if len(out) == int(max_new_tokens):
                break
            last = next(r for _, r in self.decoder.decode([tok], pos))[-1]
            pos += 1
        return out

    def close(self) -> None:
        if getattr(self, "decoder", None) is not None:
            self.decoder.close()
            self.decoder = None
        if getattr(self, "llm", None) is not None:
            self.llm.close()
            self.llm = None
