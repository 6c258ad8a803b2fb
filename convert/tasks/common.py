"""Helpers shared by the project's lm-eval tasks (imported by absolute name: lm-eval loads task modules by path)."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

# weights never decide tokenisation and are too big to read for a cache key
_NOT_TOKENIZER = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".png")


def tokenizer_digest(path: str) -> str:
    """A digest of the files a tokenizer is loaded from: every small file of the folder (tokenizer.json, its config,
    vocab/merges, config.json), so a new tokenizer written at the same path has a new digest.  A name that is not a
    folder (a hub id) is its own key."""
    from convert.files import combine, file_digest

    d = Path(path)
    if not d.is_dir():
        return f"name:{path}"
    files = sorted(f for f in d.iterdir() if f.is_file() and not f.name.endswith(_NOT_TOKENIZER))
    return combine({f.name: file_digest(f) for f in files})


def tokenizer(path: str):
    """The tokenizer the documents are sized with, loaded once per content (the files at ``path``, by digest)."""
    return _load_tokenizer(path, tokenizer_digest(path))


@lru_cache(maxsize=4)
def _load_tokenizer(path: str, digest: str):
    from transformers import AutoTokenizer

    from ..quiet import quiet_libraries

    with quiet_libraries():
        return AutoTokenizer.from_pretrained(path)
