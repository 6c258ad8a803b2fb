"""KEY=VALUE options as the command line, recipes' spec strings and the benchmarks write them: one parser."""

from __future__ import annotations

from typing import Iterable

from convert.errors import ConvertError


def parse_key_values(pairs: Iterable[str], what: str, example: str, none_words: bool = False) -> dict:
    """``["k=v", ...]`` -> {k: v}, each value read as a YAML scalar or list (numbers, booleans, ``[a, b]``); an
    empty value is None.  ``none_words``: the word ``none`` is None too (but not for ``temperature``, where "none"
    is a named temperature).  A part without ``=`` or without a key is refused, naming ``what`` and ``example``."""
    pairs = list(pairs)
    if not pairs:
        return {}  # nothing to read: no YAML parser to import (a command without --opt stays light)
    import yaml

    out = {}
    for p in pairs:
        key, sep, val = p.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConvertError(f"{what} '{p}' is not KEY=VALUE (e.g. {example})")
        v = yaml.safe_load(val) if val.strip() else None
        if none_words and isinstance(v, str) and v.lower() == "none" and key != "temperature":
            v = None
        out[key] = v
    return out


def parse_spec(spec: str, what: str, example: str) -> tuple[str, dict]:
    """``'name'`` or ``'name:key=value:key=value'`` -> (name, options)."""
    name, *parts = spec.strip().split(":")
    return name.strip(), parse_key_values(parts, f"{what} '{spec}':", example)
