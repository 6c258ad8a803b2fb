"""Perplexity by length on a local text corpus.

Document k for length L is the first L tokens of the corpus chunk k (chunks are ``chunk_tokens`` long, the
longest length of the run), so the same documents are scored at every length.  Because a causal model scores a
prefix the same whatever follows, the log-likelihood of tokens in (L1, L2] is LL(L2) - LL(L1): the report turns
the per-length sums into per-bucket perplexities ("ppl at 8k-16k").
"""

from __future__ import annotations

import math
from functools import lru_cache
from pathlib import Path

import datasets

from convert.evaluate.tasks.common import tokenizer as load_tokenizer


def default_corpus_text() -> str:
    """Python's own documentation (pydoc_data.topics): ~465k characters on every CPython."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k] for k in sorted(topics))


@lru_cache(maxsize=1)
def _pydoc_text() -> str:
    return default_corpus_text()


def corpus_text(path: str | None) -> str:
    """The corpus as it is now: a file is read on every call (a cache by path would serve an edited file's old
    text); Python's docs, which cannot change while the process runs, are read once."""
    return Path(path).read_text(encoding="utf-8", errors="replace") if path else _pydoc_text()


def make_dataset(length: int, tokenizer: str, chunk_tokens: int | None = None, corpus: str | None = None,
                 **_) -> dict:
    tok = load_tokenizer(str(tokenizer))
    length = int(length)
    chunk = int(chunk_tokens or length)
    ids = tok(corpus_text(corpus), add_special_tokens=False).input_ids
    n_docs = len(ids) // chunk
    if n_docs < 1:
        raise ValueError(f"the corpus has {len(ids)} tokens, fewer than one {chunk}-token document; pass a longer "
                         "corpus with --corpus")
    rows = []
    for k in range(n_docs):
        window = ids[k * chunk : k * chunk + length]
        text = tok.decode(window)
        n = len(tok(text, add_special_tokens=False).input_ids)
        while n > length:  # a decode/encode round trip can merge differently at the edges
            window = window[:-1]
            text = tok.decode(window)
            n = len(tok(text, add_special_tokens=False).input_ids)
        rows.append({"text": text, "n_tokens": n, "length": length, "doc": k})
    return {"test": datasets.Dataset.from_list(rows)}


def process_results(doc: dict, results) -> dict:
    ll = float(results[0])
    n = int(doc["n_tokens"])
    return {"token_perplexity": (ll, n), "loglik_sum": ll, "token_count": n}


def token_perplexity(items) -> float:
    ll = sum(i[0] for i in items)
    n = sum(i[1] for i in items)
    return math.exp(-ll / n)


def total(items) -> float:
    return float(sum(items))
