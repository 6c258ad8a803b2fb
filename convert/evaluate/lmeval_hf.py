"""The lm-eval model the validate stage and the quality benchmark run: lm-eval's own ``HFLM`` with a rolling
log-likelihood that scores long windows in chunks.

``HFLM.loglikelihood_rolling`` materialises full-vocabulary logits for every position of a window (and their
log-softmax): at 32k tokens and a 49k vocabulary that is 6.4 GB twice.  Here the decoder runs once per window and
the output head plus log-softmax run over ``logit_chunk`` positions at a time, so memory holds one chunk of logits.
The windows are lm-eval's own (``utils.get_rolling_token_windows`` + ``make_disjoint_window``), so the sums equal
the stock implementation's.  Per-token log-probabilities of every request are kept (``token_logprobs``, by
``doc_id``) for perplexity-by-position curves.
"""

from __future__ import annotations

import logging

import numpy as np

log = logging.getLogger(__name__)

DEFAULT_LOGIT_CHUNK = 1024


def chunked_token_logprobs(model, input_ids, targets, chunk: int = DEFAULT_LOGIT_CHUNK, **forward) -> np.ndarray:
    """log p(targets[j] | input_ids[:j+1]) for a causal LM, float32 [n]; ``targets`` align with the LAST len(targets)
    positions of ``input_ids`` ([1, T] int64).  Logits exist for ``chunk`` positions at a time.  ``forward``: more
    arguments of the decoder's forward (``position_ids`` and ``attention_mask`` for sparse positions)."""
    import torch

    n = len(targets)
    base = getattr(model, model.base_model_prefix)
    head = model.get_output_embeddings()
    with torch.no_grad():
        hidden = base(input_ids=input_ids, **forward).last_hidden_state[0, -n:]  # [n, hidden]
        tgt = torch.as_tensor(targets, dtype=torch.long, device=hidden.device)
        out = torch.empty(n, dtype=torch.float32)
        for i in range(0, n, chunk):
            logits = head(hidden[i : i + chunk]).float()  # [c, vocab]
            lp = torch.log_softmax(logits, dim=-1)
            out[i : i + chunk] = lp.gather(1, tgt[i : i + chunk, None])[:, 0].cpu()
            del logits, lp
    return out.numpy()


def rolling_loglikelihoods(lm, requests, score, disable_tqdm: bool = False) -> list[float]:
    """lm-eval's ``loglikelihood_rolling`` for any scorer: each document cut into lm-eval's own disjoint rolling
    windows (``get_rolling_token_windows`` + ``make_disjoint_window``), ``score(input_ids, targets)`` giving the
    targets' log-probabilities per window; per-token log-probabilities kept in ``lm.token_logprobs`` by ``doc_id``."""
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
    from tqdm.auto import tqdm

    out = []
    for req in tqdm(requests, desc="perplexity", leave=False, disable=disable_tqdm or lm.rank != 0):
        (string,) = req.args
        # the document's own tokens, BOS not among them: it is the prefix token of the first window, never a scored
        # token (lm-eval's HFLM scores it when the tokenizer adds BOS by default, as Gemma's does, and then counts a
        # token the document does not have)
        windows = map(make_disjoint_window, get_rolling_token_windows(
            token_list=lm.tok_encode(string, add_special_tokens=False), prefix_token=lm.prefix_token_id,
            max_seq_len=lm.max_length, context_len=1))
        parts = [score((context + cont)[:-1], cont) for context, cont in windows]
        lps = np.concatenate(parts) if parts else np.zeros(0, np.float32)
        lm.token_logprobs[int(getattr(req, "doc_id", len(out)))] = lps
        total = float(lps.astype(np.float64).sum())
        out.append(total)
        lm.cache_hook.add_partial("loglikelihood_rolling", (string,), total)
    return out


def chunked_lm_class():
    """``ChunkedHFLM``, built on first use (lm-eval's import costs seconds)."""
    from lm_eval.models.huggingface import HFLM

    class ChunkedHFLM(HFLM):
        def __init__(self, *args, logit_chunk: int = DEFAULT_LOGIT_CHUNK, **kw):
            super().__init__(*args, **kw)
            self.logit_chunk = int(logit_chunk)
            self.token_logprobs: dict[int, np.ndarray] = {}

        def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
            import torch

            def score(ids: list[int], cont: list[int]) -> np.ndarray:
                x = torch.tensor([ids], dtype=torch.long, device=self.device)
                return chunked_token_logprobs(self.model, x, cont, self.logit_chunk)

            return rolling_loglikelihoods(self, requests, score, disable_tqdm)

    return ChunkedHFLM
