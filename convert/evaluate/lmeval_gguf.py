"""An lm-eval model over llama-cpp-python, in process: the GGUF file users run, scored by the same tasks as the
HF checkpoint.  Registered with lm-eval as ``dprope-gguf`` when this module is imported::

    import convert.evaluate.lmeval_gguf, lm_eval
    lm_eval.simple_evaluate(model="dprope-gguf", model_args="pretrained=model.gguf,max_length=16384", tasks=[...])

lm-eval ships no GGUF model that runs without a server (EleutherAI/lm-evaluation-harness issue 2525; its
``gguf`` model calls a llama.cpp server's completion endpoint).  Here:

- ``loglikelihood`` and ``loglikelihood_rolling`` follow lm-eval's ``HFLM`` (lm_eval/models/huggingface.py): the
  same left truncation to ``max_length``, the same rolling windows (``utils.get_rolling_token_windows`` +
  ``make_disjoint_window``), the same prefix token (BOS, else EOS).  Each window is decoded from an empty cache with
  only its scored positions flagged for output (``llama_batch.logits``): llama.cpp computes the output head for
  those rows alone and hands them back in slices of at most ``Decoder.max_rows`` (``n_ubatch``, lowered for large
  vocabularies so a slice stays within ``LOGIT_BYTES``: ``convert.runtimes.llamacpp``), each reduced to the targets'
  log-probabilities before the next is asked for, so memory holds one slice of logits, never ``n_ctx x n_vocab``;
  the context prefix of a window (the tokens before its first scored one) goes in one ``llama_decode`` call with no
  output rows.  Per-token log-probabilities are kept by ``doc_id`` (``token_logprobs``) like ``ChunkedHFLM``'s.
- ``generate_until`` decodes greedily (argmax), stopping at an end-of-generation token, a stop string or
  ``max_gen_toks``, like ``HFLM`` with ``do_sample=False``; prompts are left-truncated to ``max_length -
  max_gen_toks``.  A prompt goes in one ``llama_decode`` call with only its last row of logits.  Requests are run in
  the order of their token sequences, and each keeps the KV cache of the prefix it shares with the one before
  (passkey prompts share their filler up to the key, RULER's the haystack up to the first needle), decoding only
  from the first differing token; the answers are the same as from an empty cache.
- Text is tokenised by the GGUF's own tokenizer (llama.cpp), adding BOS where the file says to
  (``tokenizer.ggml.add_bos_token``), as transformers does from the same setting.

The context is allocated once at ``n_ctx`` (default: the file's ``context_length``, i.e. the target length of an
extended model, which is what users run it at); ``max_length`` is the longest prompt scored, like ``HFLM``'s.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs, postprocess_generated_text
from tqdm.auto import tqdm

from convert.errors import ConvertError
from convert.runtimes.llamacpp import Decoder, LlamaCppOptions, gguf_context_length, log_softmax_at, native_logs, open_llama
from convert.evaluate.lmeval_hf import rolling_loglikelihoods

log = logging.getLogger(__name__)
MODEL_NAME = "dprope-gguf"


class GGUFModel:
    """A GGUF loaded once in llama.cpp at context ``n_ctx``, shared by the lm-eval models of several lengths."""

    def __init__(self, path: Path | str, n_ctx: int | None = None, options: LlamaCppOptions = LlamaCppOptions()):
        self.path = Path(path)
        self.options = options
        self.n_ctx = int(n_ctx or gguf_context_length(self.path))
        self.llm = open_llama(self.path, self.n_ctx, options)
        self.decoder = Decoder(self.llm)
        self.n_ctx = self.decoder.n_ctx  # what llama.cpp allocated
        self.options = options.for_vocab(self.decoder.n_vocab)  # the n_ubatch it runs with

    def close(self) -> None:
        self.decoder.close()
        self.llm.close()

    def __enter__(self) -> "GGUFModel":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def score(self, inputs: list[int], targets: list[int]) -> tuple[np.ndarray, np.ndarray]:
        """log p(targets[j] | inputs[:len(inputs) - len(targets) + j + 1]) float32 [n] and whether each target is
        the argmax, from an empty cache; ``targets`` align with the LAST len(targets) positions of ``inputs``.  Only
        those positions are flagged for output; each slice of their logits (at most ``decoder.max_rows`` rows) is
        reduced to log-probabilities (:func:`log_softmax_at`) as it arrives."""
        n = len(targets)
        flags = np.zeros(len(inputs), dtype=bool)
        flags[len(inputs) - n :] = True
        tgt = np.asarray(targets, dtype=np.int64)
        lps = np.empty(n, dtype=np.float32)
        greedy = np.empty(n, dtype=bool)
        self.decoder.clear()
        offset = len(inputs) - n
        for idx, rows in self.decoder.decode(inputs, 0, flags):
            j = idx - offset
            lps[j], greedy[j] = log_softmax_at(rows, tgt[j], scratch=True)  # llama.cpp's buffer, read once
        return lps, greedy

    def greedy(self, prompt: list[int], max_new: int, stop) -> list[int]:
        """Greedy continuation of ``prompt``: at most ``max_new`` tokens, ending before an end-of-generation token
        or once ``stop(tokens)`` is true.  The cached prefix ``prompt`` shares with what was decoded last is kept;
        the rest of the prompt (at least its last token, whose logits start the answer) goes in one call."""
        d = self.decoder
        start = d.reuse(prompt, len(prompt) - 1)
        out: list[int] = []
        flags = np.zeros(len(prompt) - start, dtype=bool)
        flags[-1] = True
        rows = [r for _, r in d.decode(prompt[start:], start, flags)][-1]
        while len(out) < max_new:
            nxt = int(np.argmax(rows[0]))
            if d.is_eog(nxt):
                break
            out.append(nxt)
            if stop(out) or len(out) >= max_new:
                break
            rows = next(d.decode([nxt], len(prompt) + len(out) - 1))[1]
        return out


def _options(kv_cache: str, flash_attn, n_batch, n_ubatch, n_threads) -> LlamaCppOptions:
    truthy = flash_attn if flash_attn is None or isinstance(flash_attn, bool) else \
        str(flash_attn).lower() in ("1", "true", "yes", "on")
    return LlamaCppOptions(kv_cache=str(kv_cache), flash_attn=truthy, n_batch=int(n_batch) if n_batch else None,
                           n_ubatch=int(n_ubatch), n_threads=int(n_threads) if n_threads else None)


@register_model(MODEL_NAME)
class GGUFLM(TemplateLM):
    """lm-eval model of a GGUF file run by llama-cpp-python in this process.

    model_args: ``pretrained`` (a .gguf path, or an open ``GGUFModel`` to share), ``max_length`` (longest scored
    prompt; default n_ctx), ``n_ctx`` (default: the file's context_length, at least max_length), ``kv_cache``
    (f16 | f32), ``flash_attn``, ``n_batch``, ``n_ubatch``, ``n_threads`` (``convert.runtimes.llamacpp``'s
    ``LlamaCppOptions``), ``max_gen_toks``.
    """

    def __init__(self, pretrained: str | Path | GGUFModel, max_length: int | None = None, n_ctx: int | None = None,
                 kv_cache: str = "f16", flash_attn: bool | str | None = None, n_batch: int | None = None,
                 n_ubatch: int = 512, n_threads: int | None = None, max_gen_toks: int = 256, batch_size: Any = 1,
                 device: str = "cpu",
                 **kwargs):
        super().__init__()
        if kwargs:
            log.info("dprope-gguf ignores model args %s", sorted(kwargs))
        if isinstance(pretrained, GGUFModel):
            self.model, self._owns = pretrained, False
        else:
            want = max(int(n_ctx or 0), int(max_length or 0)) or None
            if want is not None and not n_ctx:
                want = max(want, gguf_context_length(Path(pretrained)))
            self.model = GGUFModel(pretrained, want, _options(kv_cache, flash_attn, n_batch, n_ubatch, n_threads))
            self._owns = True
        self._max_length = int(max_length or self.model.n_ctx)
        if self._max_length > self.model.n_ctx:
            raise ConvertError(f"max_length {self._max_length} is above the loaded context ({self.model.n_ctx} "
                               "tokens); open the GGUF with n_ctx >= max_length")
        self.max_gen_toks = int(max_gen_toks)
        self.batch_size = 1
        self._device = device
        self.token_logprobs: dict[int, np.ndarray] = {}
        llm = self.model.llm
        self._eos = int(llm.token_eos())
        bos = int(llm.token_bos())
        self._bos = bos if bos >= 0 else None
        self._bos_text = self.tok_decode([self._bos], special=True) if self._bos is not None else None

    # ------------------------------------------------------------------ properties lm-eval reads
    @property
    def eot_token_id(self) -> int:
        return self._eos

    @property
    def prefix_token_id(self) -> int:
        return self._bos if self._bos is not None else self._eos

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def device(self) -> str:
        return self._device

    @property
    def tokenizer_name(self) -> str:
        return str(self.model.path)

    def get_model_info(self) -> dict:
        return {"model_runtime": "llama.cpp", "gguf": str(self.model.path), "n_ctx": self.model.n_ctx,
                **{f"llama_cpp_{k}": v for k, v in self.model.options.key().items()}}

    def close(self) -> None:
        if self._owns:
            self.model.close()

    # ------------------------------------------------------------------ tokens
    def tok_encode(self, string: str, add_special_tokens: bool | None = None, left_truncate_len: int | None = None,
                   **kwargs) -> list[int]:
        add = True if add_special_tokens is None else bool(add_special_tokens)
        if add_special_tokens is None and self._bos_text and string.startswith(self._bos_text):
            add = False  # the text already starts with BOS (as HFLM.tok_encode checks)
        # add_bos=True adds BOS only where the GGUF says to (llama_tokenize's add_special)
        ids = self.model.llm.tokenize(string.encode("utf-8"), add_bos=add, special=True)
        return ids[-left_truncate_len:] if left_truncate_len else ids

    def tok_decode(self, tokens, special: bool = False) -> str:
        tokens = [tokens] if isinstance(tokens, int) else list(tokens)
        return self.model.llm.detokenize(tokens, special=special).decode("utf-8", errors="replace")

    # ------------------------------------------------------------------ scoring
    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        out = []
        for key, context_enc, continuation_enc in tqdm(requests, desc="loglikelihood", leave=False,
                                                       disable=disable_tqdm or self.rank != 0):
            if len(continuation_enc) > self.max_length:
                raise ConvertError(f"a continuation of {len(continuation_enc)} tokens is longer than max_length "
                                   f"{self.max_length}")
            inp = (context_enc + continuation_enc)[-(self.max_length + 1) :][:-1]
            lps, greedy = self.model.score(inp, continuation_enc)
            ans = (float(lps.astype(np.float64).sum()), bool(greedy.all()))
            out.append(ans)
            if key is not None:
                self.cache_hook.add_partial("loglikelihood", key, ans)
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        return rolling_loglikelihoods(self, requests, lambda ids, cont: self.model.score(ids, cont)[0], disable_tqdm)

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        eos_text = self.tok_decode([self._eos], special=True)
        jobs = []
        for req in requests:
            context, gen_kwargs = req.args
            kw = normalize_gen_kwargs(dict(gen_kwargs), self.max_gen_toks)
            if kw.get("do_sample"):
                raise ConvertError("dprope-gguf generates greedily; this task asks for sampling (do_sample=True)")
            until = handle_stop_sequences(kw.pop("until", None), eos=eos_text)
            max_new = int(kw.pop("max_gen_toks"))
            if max_new >= self.max_length:
                raise ConvertError(f"max_gen_toks {max_new} leaves no room for a prompt in max_length "
                                   f"{self.max_length}")
            jobs.append((self.tok_encode(context, left_truncate_len=self.max_length - max_new), max_new, until))
        # in token order, so neighbours share the longest prefixes and each keeps its predecessor's cache
        order = sorted(range(len(jobs)), key=lambda i: jobs[i][0])
        out: list[str] = [""] * len(jobs)
        for i in tqdm(order, desc="generate", leave=False, disable=disable_tqdm or self.rank != 0):
            prompt, max_new, until = jobs[i]
            stops = [u for u in until if u]
            toks = self.model.greedy(prompt, max_new, lambda t: any(u in self.tok_decode(t) for u in stops))
            out[i] = postprocess_generated_text(self.tok_decode(toks), until, None)
            self.cache_hook.add_partial("generate_until", requests[i].args, out[i])
        return out


def open_model(path: Path | str, n_ctx: int | None = None, options: LlamaCppOptions = LlamaCppOptions()) -> GGUFModel:
    """Load a GGUF for evaluation with llama.cpp's log lines sent to Python logging."""
    with native_logs():
        return GGUFModel(path, n_ctx, options)
