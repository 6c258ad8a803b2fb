"""Helpers shared by the project's lm-eval tasks (imported by absolute name: lm-eval loads task modules by path)."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

# what a transformers tokenizer is loaded from (tokenization_utils_base.py: VOCAB_FILES_NAMES and the configs)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "vocab.json", "vocab.txt", "merges.txt", "tokenizer.model", "spiece.model", "sentencepiece.bpe.model")


def tokenizer_digest(path: str | None) -> str | None:
    """The tokenizer at ``path`` by content: its files and config.json's model_type (AutoTokenizer's fallback for
    the class), so a new tokenizer written at the same path has a new digest, while two checkpoints of one model
    with other RoPE settings share one.  A name that is not a folder (a hub id) is its own key; None stays None."""
    import json

    from convert.io.files import combine, file_digest

    if not path:
        return None
    d = Path(path)
    if not d.is_dir():
        return f"name:{path}"
    parts = {f: file_digest(d / f) for f in TOKENIZER_FILES if (d / f).is_file()}
    if (d / "config.json").is_file():
        parts["model_type"] = str(json.loads((d / "config.json").read_text()).get("model_type"))
    return combine(parts)


def tokenizer(path: str):
    """The tokenizer the documents are sized with, loaded once per content (the files at ``path``, by digest)."""
    return _load_tokenizer(path, tokenizer_digest(path))


@lru_cache(maxsize=4)
def _load_tokenizer(path: str, digest: str):
    from transformers import AutoTokenizer

    from convert.quiet import quiet_libraries

    with quiet_libraries():
        return AutoTokenizer.from_pretrained(path)
