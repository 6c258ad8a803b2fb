"""Helpers shared by the project's lm-eval tasks (imported by absolute name: lm-eval loads task modules by path)."""

from __future__ import annotations

from functools import lru_cache


@lru_cache(maxsize=4)
def tokenizer(path: str):
    """The tokenizer the documents are sized with, loaded once per path."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)
