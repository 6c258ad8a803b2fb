"""Per-pair choice among candidates from their disturbances (Wu et al., EMNLP 2024: argmin, threshold t, top-n)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .errors import DPRoPEError

MODES = ("argmin", "threshold", "top-n", "tolerance")


@dataclass(frozen=True)
class Selection:
    """How a candidate is chosen per pair.

    argmin:    the smallest disturbance wins; exact ties go to the earlier candidate (reference behaviour).
    threshold: keep the first candidate unless another one is lower by more than ``value`` (the paper's t).
    top-n:     switch exactly the ``value`` pairs with the largest gain (first candidate's disturbance minus the
               best other one's) to their best other candidate (the paper's n-hat interpolated pairs).
    tolerance: among the candidates whose disturbance is within ``value`` of the pair's smallest, the one that
               changes the frequency least (smallest factor; the earlier candidate on equal factors).  With the
               paper's two candidates this is ``threshold``; with a grid of factors it picks the mildest scaling
               that keeps the angle distribution as close as the closest one, up to ``value`` nats.
    """

    mode: str = "argmin"
    value: float | None = None

    @classmethod
    def parse(cls, spec: "str | Selection") -> "Selection":
        if isinstance(spec, Selection):
            return spec.validated()
        text = spec.strip().lower()
        for sep in (":", "="):
            if sep in text:
                mode, raw = text.split(sep, 1)
                break
        else:
            mode, raw = text, None
        mode = {"tol": "tolerance", "top": "top-n", "topn": "top-n", "top_n": "top-n", "t": "threshold"}.get(mode, mode)
        value: float | None = None
        if raw is not None:
            try:
                value = float(raw)
            except ValueError:
                raise DPRoPEError(f"selection '{spec}': '{raw}' is not a number") from None
        return cls(mode, value).validated()

    def validated(self) -> "Selection":
        if self.mode not in MODES:
            raise DPRoPEError(
                f"unknown selection '{self.mode}'; use argmin, threshold:T (e.g. threshold:0.05), top-n:N "
                "(e.g. top-n:40) or tolerance:T (e.g. tolerance:0.01)"
            )
        if self.mode == "argmin" and self.value is not None:
            raise DPRoPEError("argmin takes no value; use threshold:T or top-n:N for a tuned choice")
        if self.mode != "argmin" and self.value is None:
            raise DPRoPEError(f"selection {self.mode} needs a value, e.g. {self.mode}:{40 if self.mode == 'top-n' else 0.05}")
        if self.mode in ("threshold", "tolerance") and not self.value >= 0:
            raise DPRoPEError(f"{self.mode} needs a value >= 0 (nats), got {self.value}")
        if self.mode == "top-n" and (self.value < 0 or int(self.value) != self.value):
            raise DPRoPEError(f"top-n needs a whole number of pairs >= 0, got {self.value}")
        return self

    def __str__(self) -> str:
        if self.mode == "argmin":
            return "argmin"
        v = int(self.value) if self.mode == "top-n" else self.value
        return f"{self.mode}:{v}"


def choose(per_pair: np.ndarray, selection: Selection, factors: np.ndarray | None = None) -> np.ndarray:
    """Index of the chosen candidate per pair.  per_pair: float64 [n_candidates, n_pairs] -> int64 [n_pairs].

    factors: float32 [n_candidates, n_pairs], needed by ``tolerance`` (it prefers the smallest factor)."""
    per_pair = np.asarray(per_pair, dtype=np.float64)
    n_cand, n_pairs = per_pair.shape
    if selection.mode == "tolerance":
        if factors is None:
            raise DPRoPEError("tolerance selection needs the candidates' factors")
        eligible = per_pair <= per_pair.min(0) + float(selection.value)  # [n_cand, n_pairs]
        key = np.where(eligible, np.asarray(factors, dtype=np.float64), np.inf)
        # smallest factor; on equal factors the first candidate (argmin returns the first minimum)
        return np.argmin(key, axis=0).astype(np.int64)
    # best candidate per pair, first one on an exact tie
    best = np.zeros(n_pairs, dtype=np.int64)
    best_val = per_pair[0].copy()
    for c in range(1, n_cand):
        better = per_pair[c] < best_val
        best[better] = c
        best_val = np.where(better, per_pair[c], best_val)
    if selection.mode == "argmin" or n_cand == 1:
        if selection.mode == "top-n" and selection.value and n_cand == 1:
            raise DPRoPEError("top-n needs at least two candidates")
        return best

    # best among the candidates other than the first one (the baseline)
    alt = np.ones(n_pairs, dtype=np.int64)
    alt_val = per_pair[1].copy()
    for c in range(2, n_cand):
        better = per_pair[c] < alt_val
        alt[better] = c
        alt_val = np.where(better, per_pair[c], alt_val)
    gain = per_pair[0] - alt_val  # > 0: the alternative disturbs less than the baseline

    chosen = np.zeros(n_pairs, dtype=np.int64)
    if selection.mode == "threshold":
        switch = gain > float(selection.value)
    else:
        n = int(selection.value)
        if n > n_pairs:
            raise DPRoPEError(f"top-n:{n} asks for more pairs than the model has ({n_pairs})")
        order = np.argsort(-gain, kind="stable")  # largest gain first, lower pair index on ties
        switch = np.zeros(n_pairs, dtype=bool)
        switch[order[:n]] = True
    chosen[switch] = alt[switch]
    return chosen
