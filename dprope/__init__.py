"""DPRoPE: per-pair RoPE scaling chosen by rotary-angle distribution (Wu et al., EMNLP 2024).

Pure computation: no file I/O and no transformers import.
"""

from .candidates import (
    DEFAULT_CANDIDATES,
    Candidate,
    available_candidates,
    get_candidate,
    llama3_factors,
    register_candidate,
    unregister_candidate,
    yarn_factors,
)
from .core import DEFAULT_BINS, DPRoPEResult, compute_factors
from .errors import DPRoPEError
from .freqs import RopeContext, base_inv_freq
from .histogram import PSEUDO_COUNT, angle_distribution, angle_histogram, kl_divergence
from .select import Selection, choose

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_BINS",
    "DEFAULT_CANDIDATES",
    "PSEUDO_COUNT",
    "Candidate",
    "DPRoPEError",
    "DPRoPEResult",
    "RopeContext",
    "Selection",
    "angle_distribution",
    "angle_histogram",
    "available_candidates",
    "base_inv_freq",
    "choose",
    "compute_factors",
    "get_candidate",
    "kl_divergence",
    "llama3_factors",
    "register_candidate",
    "unregister_candidate",
    "yarn_factors",
]
