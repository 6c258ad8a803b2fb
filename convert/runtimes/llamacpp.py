"""The one place that drives llama-cpp-python below its ``Llama`` class: decoding a batch with chosen output rows,
clearing the context's memory, and routing llama.cpp's own log lines into Python logging.

``Llama.eval`` asks llama.cpp for the logits of every position only when the model was created with
``logits_all=True``, and then keeps them all in ``Llama.scores``, an ``n_ctx x n_vocab`` float32 array (6.4 GB at
32k tokens and a 49k vocabulary; abetlen/llama-cpp-python ``llama_cpp/llama.py``, ``Llama.__init__`` and
``Llama.eval``).  Here a model is created with ``logits_all=False`` and batches are decoded through llama.cpp's C
API (``llama_batch_init``, ``llama_decode``, ``llama_get_logits``, ``llama_memory_clear``, ``llama_memory_seq_rm``:
ggml-org/llama.cpp ``include/llama.h``, bound one to one in ``llama_cpp/llama_cpp.py``), asking for the rows a caller
needs: a position's logits are computed and handed back only where its ``llama_batch.logits`` flag is set
(``include/llama.h``, ``struct llama_batch``: "if zero, the logits ... for the respective token will not be output";
each model's graph drops the other rows in its last layer, before the output head: ``src/models/<arch>.cpp``, "skip
computing output for unused tokens", with ``build_inp_out_ids`` of ``src/llama-graph.cpp``).  A call asks for at most
``Decoder.max_rows`` rows (``n_ubatch``, which :func:`open_llama` lowers for large vocabularies so a ubatch's logits
stay within ``LOGIT_BYTES``), so memory holds one slice of logits whatever the context, and a prompt whose logits are
not needed goes in one ``llama_decode`` call.  Everything else (loading, tokenising, detokenising) uses ``Llama``'s
public methods.  ``tests/test_llamacpp.py`` pins this module to the installed llama-cpp-python: its logits equal
``Llama.eval``'s with ``logits_all=True``.
"""

from __future__ import annotations

import collections
import contextlib
import ctypes
import logging
import os
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Iterator, Literal, Sequence

import numpy as np

from convert.compat import llama_cpp_log_callback
from convert.errors import ConvertError
from convert.runtimes.base import Runtime, register_runtime

log = logging.getLogger(__name__)
NATIVE = logging.getLogger("llama.cpp")  # llama.cpp's own log lines (its stderr output otherwise)
# A library's records reach the application's handlers, never Python's last-resort stderr handler when the
# application configured none (the logging HOWTO, "Configuring Logging for a Library")
NATIVE.addHandler(logging.NullHandler())

# The most bytes of logits (float32 rows of the vocabulary) one ubatch computes and one llama_decode call hands back:
# 512 rows of a vocabulary of up to 131,072 tokens (SmolLM2, Llama 3: llama.cpp's default n_ubatch), 256 rows of
# Gemma 3's 262,144.  llama.cpp sizes its compute buffer for n_ubatch rows of logits (src/llama-context.cpp: the
# worst-case graph is reserved with n_outputs = n_ubatch) and its output buffer for the rows one call asks for.
LOGIT_BYTES = 256 << 20

# ggml_type ids of the KV cache types offered (ggml-org/llama.cpp ggml/include/ggml.h: GGML_TYPE_F32 = 0, F16 = 1)
KV_TYPES = {"f32": 0, "f16": 1}
# enum ggml_log_level -> logging level, as ggml-org/llama.cpp ggml/include/ggml.h numbers it today (NONE 0, DEBUG 1,
# INFO 2, WARN 3, ERROR 4, CONT 5 = continues the previous line).  llama_cpp/_logger.py still maps the older order
# (2 -> WARNING, 3 -> ERROR, 4 -> DEBUG), so with verbose=False it prints warnings and hides errors.
_LEVELS = {0: logging.INFO, 1: logging.DEBUG, 2: logging.INFO, 3: logging.WARNING, 4: logging.ERROR}


def import_llama_cpp():
    """llama-cpp-python, with llama.cpp's AMX weight buffers off where the build uses them (:func:`_avoid_amx`)."""
    try:
        import llama_cpp
    except ImportError:
        raise ConvertError(
            "llama-cpp-python is not installed: `pip install 'dprope[llama]'` (it compiles llama.cpp; "
            "CMAKE_ARGS='-DLLAVA_BUILD=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_EXAMPLES=OFF' keeps it short)"
        ) from None
    _avoid_amx(llama_cpp)
    return llama_cpp


_AMX_CHECKED = False


def _avoid_amx(llama_cpp) -> None:
    """On a CPU with AMX (Intel Sapphire Rapids and later) llama.cpp built for the machine repacks quantised weights
    into AMX buffers, and its AMX matrix multiplication segfaults on the first evaluation on some of them
    (ggml-org/llama.cpp#20824, open; stanfordnlp/dspy#10079 removed the AMX variant for the same crash): a plain
    Q4_1 SmolLM2 crashes there.  So where llama.cpp reports AMX_INT8, every model loads with its extra buffer types
    off (``llama_model_params.use_extra_bufts``; weight repacking, AMX's included), which runs the same graph on
    plain CPU buffers.  DPROPE_LLAMA_EXTRA_BUFFERS=1 keeps them."""
    global _AMX_CHECKED
    if _AMX_CHECKED or os.environ.get("DPROPE_LLAMA_EXTRA_BUFFERS") == "1":
        return
    _AMX_CHECKED = True
    low = llama_cpp.llama_cpp
    try:
        info = llama_cpp.llama_print_system_info().decode(errors="replace")
    except Exception:  # noqa: BLE001 (an older binding: leave it as it is)
        return
    if "AMX_INT8 = 1" not in info or not hasattr(low.llama_model_params, "use_extra_bufts"):
        return
    default = low.llama_model_default_params

    def params():
        p = default()
        p.use_extra_bufts = False
        return p

    low.llama_model_default_params = params
    log.info("llama.cpp reports AMX: loading models without extra buffer types (ggml-org/llama.cpp#20824)")


def extra_buffers_off() -> bool:
    """Whether models here load without llama.cpp's extra buffer types (:func:`_avoid_amx`); llama.cpp's own tools
    run the same way with ``--no-repack`` (common/arg.cpp: ``-nr, --no-repack``)."""
    params = import_llama_cpp().llama_cpp.llama_model_default_params()
    return getattr(params, "use_extra_bufts", True) is False


@dataclass(frozen=True)
class LlamaCppOptions:
    """How a GGUF is run.  ``kv_cache``: f16 is llama.cpp's default (what its users get); f32 keeps the cache
    exact, so an f32 GGUF gives transformers' numbers up to float32 summation order.  ``flash_attn``: llama.cpp's
    fused attention, the faster path at long contexts; it casts an f32 cache to f16 (ggml-org/llama.cpp
    ``src/llama-graph.cpp``, ``build_attn_mha``), so by default (None) it is on with an f16 cache, as llama.cpp's
    own tools resolve ``--flash-attn auto`` on a CPU, and off with an f32 one; its numbers differ from the unfused
    path's by rounding.  ``n_batch``: tokens per ``llama_decode`` call (default: the whole context, so a prompt goes
    in one call); ``n_ubatch``: tokens per graph computation inside a call (llama.cpp's physical batch), and so the
    most rows of logits held at once.  ``logit_bytes``: the most bytes those rows may take (``n_ubatch x n_vocab x
    4``): a model whose vocabulary would pass it runs with ``n_ubatch`` lowered to fit (:meth:`for_vocab`; None:
    ``n_ubatch`` as given).  ``n_threads``: default every core."""

    kv_cache: Literal["f16", "f32"] = "f16"
    flash_attn: bool | None = None  # None: on with an f16 cache, off with f32; resolved at construction
    n_batch: int | None = None
    n_ubatch: int = 512
    n_threads: int | None = None
    logit_bytes: int | None = LOGIT_BYTES

    def __post_init__(self):
        if self.kv_cache not in KV_TYPES:
            raise ConvertError(f"KV cache type '{self.kv_cache}' is not offered; choose {', '.join(KV_TYPES)}")
        if (self.n_batch is not None and self.n_batch < 1) or self.n_ubatch < 1:
            raise ConvertError(f"n_batch ({self.n_batch}) and n_ubatch ({self.n_ubatch}) must be positive")
        if self.logit_bytes is not None and self.logit_bytes < 1:
            raise ConvertError(f"logit_bytes ({self.logit_bytes}) must be positive (or None: no bound)")
        resolved = self.kv_cache == "f16" if self.flash_attn is None else bool(self.flash_attn)
        object.__setattr__(self, "flash_attn", resolved)  # frozen: set once, here

    def for_vocab(self, n_vocab: int) -> "LlamaCppOptions":
        """These options as a model of ``n_vocab`` tokens runs with them: ``n_ubatch`` lowered where its rows of
        logits would pass ``logit_bytes`` (:func:`logit_rows`).  Idempotent."""
        return replace(self, n_ubatch=logit_rows(n_vocab, self.n_ubatch, self.logit_bytes))

    def key(self) -> dict:
        """What changes the numbers (thread count does not: ggml splits rows, not sums, across threads; the batch
        sizes can, through the fused attention's tiling: see ``Decoder.decode``).  ``logit_bytes`` acts only through
        ``n_ubatch``: key the options :meth:`for_vocab` gives for the model, whose ``n_ubatch`` is what runs."""
        d = asdict(self)
        d.pop("n_threads")
        d.pop("logit_bytes")
        return d


def logit_rows(n_vocab: int, n_ubatch: int, budget: int | None = LOGIT_BYTES) -> int:
    """``n_ubatch`` where ``n_ubatch`` rows of ``n_vocab`` float32 logits fit ``budget`` bytes; otherwise the largest
    power of two whose rows fit (at least 1): 256 for a 262,144-token vocabulary at 256 MiB.  ``budget`` None: no
    bound."""
    n_ubatch, n_vocab = int(n_ubatch), int(n_vocab)
    if budget is None or n_vocab < 1 or n_ubatch * n_vocab * 4 <= budget:
        return n_ubatch
    fit = max(1, int(budget) // (4 * n_vocab))
    return 1 << (fit.bit_length() - 1)


def gguf_vocab_size(path: Path) -> int:
    """The number of tokens in a GGUF's vocabulary (``tokenizer.ggml.tokens``), from its header; 0 if it has none."""
    from convert.io.gguf_meta import read_gguf

    return int(read_gguf(Path(path)).meta.get("tokenizer.ggml.tokens#len", 0))


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
        self.demote: tuple[str, ...] = ()  # substrings of warnings that are expected in the current load

    def __call__(self, level: int, text: bytes, _user) -> None:
        if level != 5:
            self.level = _LEVELS.get(level, logging.INFO)
        line = text.decode("utf-8", errors="replace").rstrip()
        if line:
            lvl = self.level
            if lvl >= logging.WARNING and any(d in line for d in self.demote):
                lvl = logging.DEBUG  # expected for this load, not a problem to report
            NATIVE.log(lvl, "%s", line)
            if lvl >= logging.WARNING:
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


def _batch_cap(n_ctx: int, n_vocab: int) -> int:
    """The largest ``n_batch`` whose side allocations in llama-cpp-python stay small enough.  ``Llama.__init__``
    allocates an ``n_batch x n_vocab`` float32 ``scores`` array (never written with ``logits_all=False``, so never
    resident) and a ``llama_batch`` of ``n_batch`` tokens with ``n_ctx`` sequence ids each (abetlen/llama-cpp-python
    ``llama_cpp/llama.py``; ggml-org/llama.cpp ``src/llama-batch.cpp`` ``llama_batch_init``: one malloc per token,
    whose header page is resident, 4 KiB per token).  Their address space is kept under half the physical memory,
    so a kernel that refuses obvious overcommits (vm.overcommit_memory 0) still gives it."""
    try:
        ram = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return n_ctx
    per_token = 4 * (int(n_vocab) + int(n_ctx))
    return max(1, min(int(n_ctx), ram // 2 // max(1, per_token)))


def open_llama(path: Path, n_ctx: int, options: LlamaCppOptions = LlamaCppOptions(), vocab_only: bool = False,
               **rope_overrides):
    """A ``Llama`` with ``logits_all=False`` and context ``n_ctx``.  The file's header and tensor extents are
    checked first, so a truncated or foreign file is refused naming the problem, not llama.cpp's 'failed to load'.
    ``rope_overrides``: llama.cpp's own context parameters for RoPE (``rope_scaling_type``, ``rope_freq_scale``,
    ``yarn_orig_ctx``, ...: llama_cpp/llama.py ``Llama.__init__``), for controls that let llama.cpp compute a
    scaling itself.  ``n_ubatch`` is the one :meth:`LlamaCppOptions.for_vocab` gives for the file's vocabulary."""
    from convert.io.gguf_meta import read_gguf

    path = Path(path)
    if not path.is_file():
        raise ConvertError(f"{path} does not exist: pass a .gguf model file")
    meta = read_gguf(path).meta
    llama_cpp = import_llama_cpp()
    threads = options.n_threads or max(1, os.cpu_count() or 1)
    n_ctx = int(n_ctx)
    n_vocab = int(meta.get("tokenizer.ggml.tokens#len", 0))
    n_batch = min(n_ctx, options.n_batch or n_ctx, _batch_cap(n_ctx, n_vocab))
    n_ubatch = min(n_batch, options.for_vocab(n_vocab).n_ubatch)
    if n_batch < n_ctx:  # a whole number of ubatches per call (Decoder.decode cuts calls at ubatch edges)
        n_batch = n_batch // n_ubatch * n_ubatch
    kw = dict(n_ctx=n_ctx, n_batch=n_batch, n_ubatch=n_ubatch, logits_all=False,
              verbose=False, vocab_only=vocab_only, n_threads=threads, n_threads_batch=threads,
              flash_attn=options.flash_attn, type_k=KV_TYPES[options.kv_cache], type_v=KV_TYPES[options.kv_cache],
              **rope_overrides)
    # swa_full: a sliding-window model's cache holds every position (llama_context_default_params' own default;
    # llama.cpp's command-line tools default to n_swa + n_ubatch cells instead).  With the smaller cache, Gemma 3
    # 270M's logits depart from a run that holds every key from position 770 on at n_ubatch 256 (|dlogit| up to 2.8;
    # docs/validation.md, Speed); with the full one they equal it bit for bit.  Set here, not left to the binding's
    # default (every llama-cpp-python this package accepts, 0.3.21 on, takes it).
    kw["swa_full"] = True
    with native_logs() as nl:
        nl.recent.clear()
        # a vocabulary-only load has no trained context (n_ctx_train 0), so llama.cpp's context check always warns
        # (src/llama-context.cpp: "n_ctx_seq (...) > n_ctx_train (...)"): nothing the caller can act on
        saved, nl.demote = nl.demote, (("n_ctx_seq", "n_ctx_train") if vocab_only else ())
        try:
            return llama_cpp.Llama(str(path), **kw)
        except ValueError as e:
            said = "; ".join(nl.recent) or str(e)
            raise ConvertError(f"llama.cpp could not load {path}: {said}. Re-export the file (dprope export-gguf) "
                               "or update llama-cpp-python") from None
        finally:
            nl.demote = saved


class Decoder:
    """Decodes one sequence (seq 0) into a ``Llama`` context, returning the logits of the rows asked for.

    It remembers the tokens the context's memory holds (``held``), so a next sequence that shares a prefix with
    them keeps it and is decoded from the first differing position (:meth:`reuse`).  ``max_rows``: the most rows of
    logits one ``llama_decode`` call asks for (default and at most ``n_ubatch``).  ``n_decoded`` counts the tokens
    sent to ``llama_decode``, ``n_calls`` the calls, ``n_outputs`` the rows of logits asked for and
    ``peak_outputs`` the most rows one call asked for."""

    def __init__(self, llm, max_rows: int | None = None):
        self.llama_cpp = import_llama_cpp()
        self.llm = llm
        self.n_batch = int(llm.n_batch)  # tokens per llama_decode call (the context's n_batch)
        self.n_ubatch = int(llm.context_params.n_ubatch)  # tokens per graph computation
        self.max_rows = self.n_ubatch if max_rows is None else max(1, min(int(max_rows), self.n_ubatch))
        self.n_ctx = int(llm.n_ctx())
        self.n_vocab = int(llm.n_vocab())
        self.n_decoded = self.n_calls = self.n_outputs = self.peak_outputs = 0
        self._held: list[int] | None = None  # tokens at positions 0.. of the memory; None: not known
        b = self._batch = self.llama_cpp.llama_batch_init(self.n_batch, 0, 1)
        for i in range(self.n_batch):  # one sequence: every token in seq 0, set once
            b.n_seq_id[i] = 1
            b.seq_id[i][0] = 0
        self._token = np.ctypeslib.as_array(b.token, shape=(self.n_batch,))
        self._pos = np.ctypeslib.as_array(b.pos, shape=(self.n_batch,))
        self._want = np.ctypeslib.as_array(b.logits, shape=(self.n_batch,))

    def close(self) -> None:
        if self._batch is not None:
            self._token = self._pos = self._want = None
            self.llama_cpp.llama_batch_free(self._batch)
            self._batch = None

    def __del__(self):
        with contextlib.suppress(Exception):
            self.close()

    @property
    def held(self) -> list[int] | None:
        """The tokens the memory holds at positions 0.. (None when not known, e.g. after a decode at a gap)."""
        return None if self._held is None else list(self._held)

    def is_eog(self, token: int) -> bool:
        """An end-of-generation token (EOS, EOT, ...) by the GGUF's vocabulary."""
        lc = self.llama_cpp
        return bool(lc.llama_vocab_is_eog(lc.llama_model_get_vocab(self.llm.model), int(token)))

    def clear(self) -> None:
        """Forget every cached position (the next decode may start at any position)."""
        mem = self.llama_cpp.llama_get_memory(self.llm.ctx)
        if mem is not None:
            self.llama_cpp.llama_memory_clear(mem, True)
        self._held = []

    def reuse(self, tokens: Sequence[int], most: int | None = None) -> int:
        """Keep the longest prefix of ``tokens`` (at most ``most`` tokens) that the memory holds, cut to a multiple of
        ``n_ubatch``, and forget every position after it (``llama_memory_seq_rm``, ggml-org/llama.cpp
        ``include/llama.h``); returns its length, the position to decode the rest of ``tokens`` from.  The cut keeps
        the rest in the same ubatches as a decode from position 0 (see :meth:`decode`), so the numbers are those of
        an empty cache.  Without a common prefix that long, or where the memory cannot drop part of a sequence (it
        says so by returning false), everything is forgotten and 0 returned."""
        held = self._held
        n = min(len(held) if held else 0, len(tokens), len(tokens) if most is None else max(0, int(most)))
        k = 0
        if n:
            diff = np.flatnonzero(np.asarray(held[:n], dtype=np.int64) != np.asarray(tokens[:n], dtype=np.int64))
            k = (int(diff[0]) if len(diff) else n) // self.n_ubatch * self.n_ubatch
        if k == 0:
            self.clear()
            return 0
        if k < len(held):
            lc = self.llama_cpp
            if not lc.llama_memory_seq_rm(lc.llama_get_memory(self.llm.ctx), 0, k, -1):
                self.clear()
                return 0
            del held[k:]
        return k

    def keep(self, n: int) -> bool:
        """Keep exactly the first ``n`` cached positions and forget the rest (``llama_memory_seq_rm``), with no cut
        to ``n_ubatch`` (unlike :meth:`reuse`): what follows is decoded in other ubatches than a decode from position
        0 would use, which changes the fused attention's sums by rounding (not the unfused path's).  False, with
        nothing kept, where the memory does not hold that many known positions or cannot drop part of a sequence."""
        held = self._held
        if held is None or len(held) < n:
            self.clear()
            return False
        if len(held) > n:
            lc = self.llama_cpp
            if not lc.llama_memory_seq_rm(lc.llama_get_memory(self.llm.ctx), 0, int(n), -1):
                self.clear()
                return False
            del held[n:]
        return True

    def decode(self, tokens: Sequence[int], start: int = 0, outputs: Sequence[bool] | None = None
               ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Decode ``tokens`` at positions start.. after what is cached, in as few ``llama_decode`` calls as
        ``n_batch`` allows with at most ``max_rows`` rows of logits each.  Yields, per call that has any, (indices
        into ``tokens``, logits [k, n_vocab] float32) for the tokens whose ``outputs`` flag is set (default: all);
        only those rows are flagged in the batch, so llama.cpp computes the output head for them alone and tokens
        with no flag (a prompt, the context prefix of a window) cost no logits.  The logits array is llama.cpp's own
        buffer (``llama_get_logits``: the call's rows, in batch order): valid until the next decode, so a caller
        reduces each slice before asking for the next.

        Calls start only at positions that are multiples of ``n_ubatch``, so llama.cpp's ubatches (``n_ubatch``
        tokens from each call's start: ggml-org/llama.cpp ``src/llama-batch.cpp``, ``split_simple``) are the same
        whichever rows are asked for and wherever a kept prefix ends.  That matters for the numbers: the CPU's fused
        attention tiles a ubatch's rows (``ggml/src/ggml-cpu/ops.cpp``, ``ggml_compute_forward_flash_attn_ext_f16``),
        and its sums depend on the tiling; the unfused path's do not.  Only a ``max_rows`` below ``n_ubatch`` (never
        the default) cuts a call inside a ubatch, after its ``max_rows``-th flagged row."""
        lc, b = self.llama_cpp, self._batch
        if b is None:
            raise ConvertError("this decoder was closed")
        n = len(tokens)
        if start + n > self.n_ctx:
            raise ConvertError(f"positions up to {start + n} do not fit the context of {self.n_ctx} tokens; "
                               "load the model with a larger n_ctx")
        ids = np.asarray(tokens, dtype=np.int32).reshape(-1)
        flags = np.ones(n, dtype=bool) if outputs is None else np.asarray(outputs, dtype=bool)
        if self._held is not None and start != len(self._held):
            self._held = None  # a gap or an overlap: what the memory holds is no longer a known prefix
        ub, cap = self.n_ubatch, self.max_rows
        s = 0
        while s < n:
            # whole ubatches (cut at multiples of n_ubatch), up to n_batch tokens and max_rows rows of logits
            e = min(n, (start + s) // ub * ub + ub - start)
            rows = int(flags[s:e].sum())
            if rows > cap:  # max_rows < n_ubatch: this ubatch's rows take more than one call
                e, rows = s + int(np.flatnonzero(flags[s:e])[cap - 1]) + 1, cap
            while e < n and (start + e) % ub == 0:
                nxt = min(n, e + ub)
                more = int(flags[e:nxt].sum())
                if nxt - s > self.n_batch or rows + more > cap:
                    break
                e, rows = nxt, rows + more
            m = e - s
            self._token[:m] = ids[s:e]
            self._pos[:m] = np.arange(start + s, start + e, dtype=np.int32)
            self._want[:m] = flags[s:e]
            b.n_tokens = m
            rc = lc.llama_decode(self.llm.ctx, b)
            self.n_decoded += m
            self.n_calls += 1
            self.n_outputs += rows
            self.peak_outputs = max(self.peak_outputs, rows)
            if rc != 0:
                self._held = None
                raise ConvertError(f"llama_decode returned {rc} at positions {start + s}..{start + e} "
                                   f"(context {self.n_ctx}): " + ("no free slot in the KV cache" if rc == 1 else
                                                                "see the log file"))
            if self._held is not None:
                self._held.extend(ids[s:e].tolist())
            idx = np.flatnonzero(flags[s:e]) + s
            s = e
            if len(idx):
                got = np.ctypeslib.as_array(lc.llama_get_logits(self.llm.ctx), shape=(len(idx) * self.n_vocab,))
                yield idx, got.reshape(len(idx), self.n_vocab)


def log_softmax_at(logits: np.ndarray, targets: np.ndarray, scratch: bool = False
                   ) -> tuple[np.ndarray, np.ndarray]:
    """log p(targets[j]) under softmax(logits[j]) (float32 [k]) and whether each target is the argmax
    (bool [k]); ``logits`` [k, vocab].  The log-sum-exp is taken in float64 (the exponentials of ``logits - max``
    summed in float64).  ``scratch``: ``logits`` may be overwritten (llama.cpp's output buffer, read once), which
    saves a [k, vocab] temporary, so a slice needs no memory beyond its own rows."""
    m = logits.max(axis=1)
    picked = logits[np.arange(len(targets)), targets]
    tmp = logits if scratch else np.empty_like(logits)
    np.subtract(logits, m[:, None], out=tmp)  # exponentiated in place
    np.exp(tmp, out=tmp)
    lse = m.astype(np.float64) + np.log(tmp.sum(axis=1, dtype=np.float64))
    return (picked - lse).astype(np.float32), picked >= m


@contextlib.contextmanager
def open_gguf(path: Path, n_ctx: int, *, f32_kv: bool = True, vocab_only: bool = False) -> Iterator:
    """:func:`open_llama` as a context manager, by default with an F32 KV cache and unfused attention (so parity is
    not limited by cache rounding); the model is closed on exit."""
    llm = open_llama(path, n_ctx, LlamaCppOptions(kv_cache="f32" if f32_kv else "f16", flash_attn=False),
                     vocab_only=vocab_only)
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

    def __init__(self, path: Path, n_ctx: int | None = None, options: LlamaCppOptions | None = None,
                 llm=None, decoder: Decoder | None = None, **rope_overrides):
        super().__init__(path)
        self._owns = llm is None
        self.llm = llm if llm is not None else open_llama(path, int(n_ctx or gguf_context_length(path)),
                                                          options or LlamaCppOptions("f32", flash_attn=False),
                                                          **rope_overrides)
        self.decoder = decoder if decoder is not None else Decoder(self.llm)
        self.n_ctx = int(self.llm.n_ctx())

    @classmethod
    def wrap(cls, llm, decoder: Decoder | None = None, path: Path | None = None) -> "LlamaCppRuntime":
        """A model already open (a ``Llama`` and its :class:`Decoder`, e.g. validation's ``GGUFModel``); closing the
        runtime leaves them open."""
        return cls(Path(path or getattr(llm, "model_path", ".")), llm=llm, decoder=decoder)

    def generate_after(self, prefix: Sequence[int], suffixes: Sequence[Sequence[int]], max_new_tokens: int,
                       stop=None) -> list[list[int]]:
        """The prefix is decoded once into the context's memory (no logits asked for); before each suffix the memory
        is cut back to exactly the prefix (:meth:`Decoder.keep`, ``llama_memory_seq_rm``) and only the suffix and
        the answer are decoded, as llama-cpp-python's ``Llama.eval`` continues from ``Llama.n_tokens``.  With the
        f32 cache (unfused attention) the answers are those of each whole prompt from an empty cache; with the f16
        cache and flash attention they can differ from them by rounding (the ubatches are cut elsewhere)."""
        d = self.decoder
        before = d.n_decoded
        prefix = [int(t) for t in prefix]
        d.clear()
        for _ in d.decode(prefix, 0, np.zeros(len(prefix), dtype=bool)):
            pass
        outs: list[list[int]] = []
        for s in suffixes:
            ids = [int(t) for t in s]
            start = len(prefix) if d.keep(len(prefix)) else 0
            if start == 0:  # the memory could not keep the prefix: the whole prompt again
                ids = prefix + ids
            flags = np.zeros(len(ids), dtype=bool)
            flags[-1] = True
            last = [r for _, r in d.decode(ids, start, flags)][-1][-1]
            pos = start + len(ids)
            out: list[int] = []
            while len(out) < int(max_new_tokens):
                tok = int(np.argmax(last))
                if d.is_eog(tok):
                    break
                out.append(tok)
                if len(out) >= int(max_new_tokens) or (stop is not None and stop(out)):
                    break
                last = next(r for _, r in d.decode([tok], pos))[-1]
                pos += 1
            outs.append(out)
        self.tokens_processed += d.n_decoded - before
        return outs

    def logits(self, token_ids: Sequence[int], start_pos: int = 0) -> np.ndarray:
        self.decoder.clear()
        ids = list(map(int, token_ids))
        rows = [r.copy() for _, r in self.decoder.decode(ids, start_pos)]
        return np.concatenate(rows).astype(np.float32)

    def generate(self, token_ids: Sequence[int], max_new_tokens: int) -> list[int]:
        """Greedy: the prompt in as few calls as n_batch allows with only its last row of logits, then one token a
        step."""
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
        if not getattr(self, "_owns", True):  # wrapped: the owner closes them
            self.decoder = self.llm = None
            return
        if getattr(self, "decoder", None) is not None:
            self.decoder.close()
            self.decoder = None
        if getattr(self, "llm", None) is not None:
            self.llm.close()
            self.llm = None
