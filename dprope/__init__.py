"""DPRoPE: per-pair RoPE scaling chosen by rotary-angle distribution (Wu et al., EMNLP 2024).

Pure computation: no file I/O and no transformers import.  Names load on first use (PEP 562), so
``import dprope`` is cheap and torch is imported only when something that computes is touched.
"""

from __future__ import annotations

import importlib
import logging

# records reach the application's handlers only (the logging HOWTO, "Configuring Logging for a Library")
logging.getLogger(__name__).addHandler(logging.NullHandler())

from .constants import BUILTIN_CANDIDATES, DEFAULT_BINS, DEFAULT_CANDIDATES, PSEUDO_COUNT

__version__ = "0.1.0"

# the methods register themselves in the registry on import (cheap: no torch at module level)
from . import methods as _methods  # noqa: E402,F401

_LAZY = {
    "Candidate": "candidates",
    "available_candidates": "candidates",
    "get_candidate": "candidates",
    "llama3_factors": "candidates",
    "register_candidate": "candidates",
    "unregister_candidate": "candidates",
    "yarn_factors": "candidates",
    "DPRoPEResult": "core",
    "compute_factors": "core",
    "DPRoPEError": "errors",
    "Detection": "dpe",
    "RopeContext": "freqs",
    "base_inv_freq": "freqs",
    "angle_distribution": "histogram",
    "angle_histogram": "histogram",
    "kl_divergence": "histogram",
    "SearchConfig": "search_config",
    "SearchResult": "search",
    "Selection": "select",
    "choose": "select",
}

__all__ = sorted([*_LAZY, "BUILTIN_CANDIDATES", "DEFAULT_BINS", "DEFAULT_CANDIDATES", "PSEUDO_COUNT"])


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'dprope' has no attribute {name!r}")


def __dir__():
    return __all__
