"""The DPRoPE computation: per rotary pair, the candidate whose angle distribution at the target length stays
closest to the pre-trained one."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np

from .candidates import get_candidate
from .constants import DEFAULT_BINS, DEFAULT_CANDIDATES
from .errors import DPRoPEError
from .freqs import RopeContext, as_array, base_inv_freq, check_inv_freq, check_target_length
from .histogram import (DEFAULT_CHUNK_ELEMS, angle_distribution, angle_histogram, coverage_distribution,
                        kl_divergence)
from .select import Selection, choose

log = logging.getLogger(__name__)



@dataclass
class DPRoPEResult:
    """What a DPRoPE run decided, and why.

    factors:     float32 [n_pairs], lambda_i; new inv_freq_i = base_inv_freq_i / lambda_i
    inv_freq:    float32 [n_pairs], the new inverse frequencies
    chosen:      candidate name per pair
    per_pair:    candidate name -> float64 [n_pairs], D_i^c = KL(P_L || P_L'^c) in nats
    disturbance: 'selected' and each candidate name -> mean over pairs (the paper's total disturbance)
    temperature: cos/sin multiplier the method pairs with its factors (1.0: none); attention logits scale by its
                 square (HF ``attention_factor``, llama.cpp ``rope.scaling.attn_factor``)
    method:      the registered method that produced it (``dprope.methods``)
    """

    factors: np.ndarray
    inv_freq: np.ndarray
    base_inv_freq: np.ndarray
    chosen: list[str]
    candidates: list[str]
    candidate_factors: dict[str, np.ndarray]
    per_pair: dict[str, np.ndarray]
    disturbance: dict[str, float]
    params: dict[str, Any] = field(default_factory=dict)
    temperature: float = 1.0
    method: str = "dprope-paper"

    @property
    def scale(self) -> float:
        return self.params["target_length"] / self.params["original_length"]

    def pairs_for(self, name: str) -> list[int]:
        """Indices of the pairs that chose candidate ``name``."""
        return [i for i, c in enumerate(self.chosen) if c == name]

    def counts(self) -> dict[str, int]:
        return {c: sum(1 for x in self.chosen if x == c) for c in self.candidates}

    def to_dict(self) -> dict[str, Any]:
        return {
            "factors": [float(x) for x in self.factors.tolist()],
            "inv_freq": [float(x) for x in self.inv_freq.tolist()],
            "base_inv_freq": [float(x) for x in self.base_inv_freq.tolist()],
            "chosen": list(self.chosen),
            "counts": self.counts(),
            "disturbance": dict(self.disturbance),
            "per_pair": {k: [float(x) for x in v.tolist()] for k, v in self.per_pair.items()},
            "candidate_factors": {k: [float(x) for x in v.tolist()] for k, v in self.candidate_factors.items()},
            "params": dict(self.params),
            "temperature": float(self.temperature),
            "method": self.method,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "DPRoPEResult":
        """The inverse of to_dict (a saved factors report back into a result)."""
        f32 = lambda x: np.array(x, dtype=np.float32)  # noqa: E731
        return cls(
            factors=f32(d["factors"]), inv_freq=f32(d["inv_freq"]), base_inv_freq=f32(d["base_inv_freq"]),
            chosen=list(d["chosen"]), candidates=list(d["params"]["candidates"]),
            candidate_factors={k: f32(v) for k, v in d["candidate_factors"].items()},
            per_pair={k: np.array(v, dtype=np.float64) for k, v in d["per_pair"].items()},
            disturbance=dict(d["disturbance"]), params=dict(d["params"]),
            temperature=float(d.get("temperature", 1.0)), method=str(d.get("method", "dprope-paper")))


def compute_factors(
    inv_freq: np.ndarray | Sequence[float] | None = None,
    *,
    rope_theta: float | None = None,
    head_dim: int | None = None,
    original_length: int,
    target_length: int,
    bins: int = DEFAULT_BINS,
    candidates: Sequence[str] = DEFAULT_CANDIDATES,
    selection: str | Selection = "argmin",
    chunk_elems: int = DEFAULT_CHUNK_ELEMS,
    extra_candidates: Mapping[str, np.ndarray] | None = None,
    density: str = "sampled",
    guard: float | None = None,
) -> DPRoPEResult:
    """DPRoPE factors for extending a model from ``original_length`` to ``target_length``.

    Give the model's effective pre-trained ``inv_freq`` (float32 [head_dim/2]; already-scaled bases such as
    Llama 3.1 pass their scaled values), or ``rope_theta`` and ``head_dim`` to build plain RoPE frequencies.
    ``rope_theta`` is also what base-defined candidates (yarn, ntk) use.

    extra_candidates: name -> float32 [n_pairs] factors, scored after the registered ``candidates`` (a grid of
        fractional factors, a searched set).
    density: "sampled" (the reference: histograms of integer positions) or "coverage" (the aliasing-free
        continuous coverage, :func:`dprope.histogram.coverage_distribution`).
    guard: pairs that turn at least this many times inside the original window keep factor 1 whatever the
        divergence says (their angles cover the circle evenly before and after; only aliasing tells them apart).
    """
    if inv_freq is None:
        if rope_theta is None or head_dim is None:
            raise DPRoPEError("give either inv_freq or both rope_theta and head_dim")
        inv_freq = base_inv_freq(rope_theta, head_dim)
    else:
        if head_dim is not None and head_dim % 2:
            raise DPRoPEError(f"head_dim must be even, got {head_dim}")
        inv_freq = check_inv_freq(inv_freq)
        if head_dim is not None and inv_freq.size != head_dim // 2:
            raise DPRoPEError(
                f"inv_freq has {inv_freq.size} values but head_dim {head_dim} has {head_dim // 2} pairs"
            )
    for name, v in (("original_length", original_length), ("target_length", target_length)):
        if isinstance(v, bool) or int(v) != v or v < 1:
            raise DPRoPEError(f"{name} must be a positive integer, got {v}")
    original_length, target_length = int(original_length), int(target_length)
    check_target_length(target_length, original_length)
    if int(bins) != bins or bins < 2:
        raise DPRoPEError(f"bins must be an integer >= 2, got {bins}")
    if not candidates and not extra_candidates:
        raise DPRoPEError("give at least one candidate (the default is extrapolation,interpolation)")
    if density not in ("sampled", "coverage"):
        raise DPRoPEError(f"density must be 'sampled' (the reference) or 'coverage', got {density!r}")
    if guard is not None and not (math.isfinite(guard) and guard > 0):
        raise DPRoPEError(f"guard must be a number of turns > 0, got {guard}")
    if rope_theta is not None and not (math.isfinite(rope_theta) and rope_theta > 0):
        raise DPRoPEError(f"rope_theta must be finite and > 0, got {rope_theta}")
    sel = Selection.parse(selection)
    cands = [get_candidate(c) for c in candidates]
    names = [c.name for c in cands] + list(extra_candidates or {})
    if len(set(names)) != len(names):
        raise DPRoPEError(f"candidates repeat: {names}")

    ctx = RopeContext(inv_freq, rope_theta, original_length, target_length)
    log.info(
        "DPRoPE %d -> %d (s=%.4g), %d pairs, %d bins, candidates %s, selection %s",
        original_length, target_length, ctx.scale, ctx.n_pairs, bins, ",".join(names), sel,
    )
    def dist(freq: np.ndarray, length: int) -> np.ndarray:
        if density == "coverage":
            return coverage_distribution(freq, length, bins)
        return angle_distribution(angle_histogram(freq, length, bins, chunk_elems), length)

    p_orig = dist(inv_freq, original_length)

    cand_factors: dict[str, np.ndarray] = {}
    per_pair: dict[str, np.ndarray] = {}
    given = [(c.name, c.factors(ctx)) for c in cands]
    for name, raw in (extra_candidates or {}).items():
        f = as_array(raw)
        if f.size != ctx.n_pairs or not bool(np.isfinite(f).all()) or not bool((f > 0).all()):
            raise DPRoPEError(f"candidate '{name}' needs {ctx.n_pairs} finite factors > 0, got {f.size}")
        given.append((name, f))
    for name, f in given:
        new_freq = (inv_freq / f).astype(np.float32)
        cand_factors[name] = f
        per_pair[name] = kl_divergence(p_orig, dist(new_freq, target_length))
        log.debug("candidate %s: mean disturbance %.6g", name, float(per_pair[name].mean()))

    stacked = np.stack([per_pair[n] for n in names])  # [n_candidates, n_pairs]
    factors_all = np.stack([cand_factors[n] for n in names])
    idx = choose(stacked, sel, factors_all)
    guarded: list[int] = []
    if guard is not None:
        ones = [k for k, n in enumerate(names) if bool((cand_factors[n] == 1).all())]
        if not ones:
            raise DPRoPEError("guard keeps pairs at factor 1: include the extrapolation candidate")
        turns = original_length * inv_freq.astype(np.float64) / (2 * math.pi)
        mask = turns >= guard
        guarded = np.flatnonzero(mask).tolist()
        idx = np.where(mask, ones[0], idx)
    pair_ix = np.arange(ctx.n_pairs)
    factors = np.ascontiguousarray(factors_all[idx, pair_ix])
    selected = stacked[idx, pair_ix]
    disturbance = {"selected": float(selected.mean())}
    disturbance.update({n: float(per_pair[n].mean()) for n in names})
    result = DPRoPEResult(
        factors=factors,
        inv_freq=(inv_freq / factors).astype(np.float32),
        base_inv_freq=inv_freq,
        chosen=[names[i] for i in idx.tolist()],
        candidates=names,
        candidate_factors=cand_factors,
        per_pair=per_pair,
        disturbance=disturbance,
        params={
            "original_length": original_length,
            "target_length": target_length,
            "scale": ctx.scale,
            "bins": int(bins),
            "candidates": names,
            "selection": str(sel),
            "rope_theta": rope_theta,
            "head_dim": ctx.head_dim,
            "divergence": "KL(P_L || P_L'), summed over bins, nats",
            "density": density,
            "guard": guard,
            "guarded_pairs": guarded,
        },
    )
    log.info("chosen per candidate: %s; total disturbance %.6g", result.counts(), disturbance["selected"])
    return result
