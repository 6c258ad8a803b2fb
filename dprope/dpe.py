"""DPE's detection of per-group position scales, as its code does it, and its grouped positions.

DPE (Lu et al. 2025, "Effective Length Extrapolation via Dimension-Wise Positional Embeddings Manipulation";
LuLuLuyi/DPE) splits the rotary pairs into groups (8 groups of 8 pairs for head_dim 128, ``dimension_groups_range``
in its ``config/dpe_config.yaml``) and gives each group g its own scale s_g.  Its runtime (``dpe_for_llama.py``)
keeps normal RoPE inside a local window W and, for keys at distance >= W, uses Self-Extend's grouped positions
(Jin et al. 2024) with group size s_g: query position floor(p / s_g) + W - W / s_g, key position floor(p / s_g).

The scales are found by a needle-in-a-haystack sweep (``effective_length_detection/run_niah_detect.sh``): one
group at a time, that group takes each value of ``held * m`` for m in (1/16, 1/4, 1/2, 1, 2, 4, 16) while every
other group is held at ``held`` = 2 L_test / L; the best-scoring value of each group is its scale.  DPE's groups
are not monotone in frequency (Llama-3-8B: [2, 8, 2, 8, 32, 32, 32, 4]).

This module is pure: grouping, the sweep's bookkeeping and the conversion of group scales into per-pair values.
The score comes from a callable the caller supplies, ``scorer(pair_scales: float32 [n_pairs]) -> float``, higher
is better (DPE: the share of needles retrieved), where ``pair_scales[i]`` is the scale of pair i's group.  The
pipeline builds one that runs the model (``convert/evaluate/needle.py``); tests use synthetic ones.  The closest static form
of a detection is per-pair interpolation factors lambda_i = s_g (the grouped positions' slope), which a config
can carry; the local window cannot be baked.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch

from .errors import DPRoPEError
from .freqs import RopeContext

log = logging.getLogger(__name__)

Scorer = Callable[[torch.Tensor], float]

DPE_GROUPS = 8  # DPE divides the pairs evenly into eight groups
DPE_MULTIPLIERS = (1 / 16, 1 / 4, 1 / 2, 1, 2, 4, 16)  # run_niah_detect.sh: factor/16 .. factor*16
DPE_WINDOW = 1024  # local_window_size of every model in DPE's config


# ----------------------------------------------------------------------------------------------- grouping
def group_bounds(n_pairs: int, groups: int | Sequence[int] = DPE_GROUPS) -> list[int]:
    """Pair boundaries [0, b_1, ..., n_pairs] of the groups (DPE's ``dimension_groups_range``).

    ``groups``: a number of groups, split as evenly as possible (8 groups of 8 pairs for head_dim 128; with another
    head_dim the same number of groups keeps each group on the same share of the frequency spectrum, since pair i's
    frequency is b^(-2i/d)), at most one per pair; or explicit boundaries starting at 0 and ending at n_pairs.
    """
    if isinstance(groups, (list, tuple)):
        b = [int(x) for x in groups]
        if len(b) < 2 or b[0] != 0 or b[-1] != n_pairs or any(y <= x for x, y in zip(b, b[1:])):
            raise DPRoPEError(f"group boundaries must rise strictly from 0 to the number of pairs ({n_pairs}), "
                              f"e.g. [0, 8, 16, ..., {n_pairs}]; got {list(groups)}")
        return b
    if isinstance(groups, bool) or int(groups) != groups or int(groups) < 1:
        raise DPRoPEError(f"groups must be a whole number >= 1 or a list of pair boundaries, got {groups!r}")
    g = min(int(groups), n_pairs)
    if g < int(groups):
        log.warning("%d groups asked for %d pairs: using %d groups of one pair", groups, n_pairs, g)
    return [round(k * n_pairs / g) for k in range(g + 1)]


def pair_scales(bounds: Sequence[int], scales: Sequence[float]) -> torch.Tensor:
    """float32 [n_pairs]: every pair of group g gets scales[g] (DPE's per-group group size, per pair)."""
    if len(scales) != len(bounds) - 1:
        raise DPRoPEError(f"{len(bounds) - 1} groups need {len(bounds) - 1} scales, got {len(scales)}")
    bad = [s for s in scales if not (math.isfinite(float(s)) and float(s) > 0)]
    if bad:
        raise DPRoPEError(f"group scales must be finite numbers > 0, got {list(scales)}")
    out = torch.empty(bounds[-1], dtype=torch.float32)
    for g, s in enumerate(scales):
        out[bounds[g] : bounds[g + 1]] = float(s)
    return out


def held_scale(ctx: RopeContext) -> float:
    """DPE's scale for the groups not under test: 2 L_test / L (``run_niah_detect.sh``: factor)."""
    return 2.0 * ctx.target_length / ctx.original_length


def sweep_values(held: float, multipliers: Sequence[float] = DPE_MULTIPLIERS, min_scale: float = 1.0) -> list[float]:
    """The scales one group takes: held * m for each multiplier, those below ``min_scale`` dropped (a group size
    below 1 would push positions past the trained range; DPE's shell arithmetic turns them into 0), sorted, unique."""
    if not (math.isfinite(held) and held > 0):
        raise DPRoPEError(f"the held scale must be a finite number > 0, got {held!r}")
    vals = sorted({round(float(held) * float(m), 9) for m in multipliers if float(m) > 0})
    vals = [v for v in vals if v >= float(min_scale) - 1e-9]
    if not vals:
        raise DPRoPEError(f"no sweep value is >= {min_scale} (held scale {held:g}, multipliers {list(multipliers)}): "
                          "add larger multipliers or lower min_scale")
    return vals


def grouped_query_position(pos: torch.Tensor, scales: torch.Tensor, window: int) -> torch.Tensor:
    """Self-Extend / DPE query positions outside the window: floor(p / s) + W - W / s.  pos [...], scales [n]
    -> float64 [..., n] (DPE's prefill divides W by s without flooring)."""
    s = scales.to(torch.float64)
    return torch.floor(pos.to(torch.float64)[..., None] / s) + window - window / s


def grouped_key_position(pos: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """Self-Extend / DPE key positions: floor(p / s).  pos [...], scales [n] -> float64 [..., n]."""
    return torch.floor(pos.to(torch.float64)[..., None] / scales.to(torch.float64))


def default_window(original_length: int) -> int:
    """DPE's local window, 1024 (an eighth of Llama 3's 8k), at most an eighth of the original window."""
    return max(1, min(DPE_WINDOW, int(original_length) // 8))


# ----------------------------------------------------------------------------------------------- the sweep
def choose(values: Sequence[float], scores: Sequence[float], held: float) -> int:
    """Index of the best value: the highest score; among equal scores the value nearest the held scale (in log),
    then the smaller one (DPE leaves ties to whoever sorts its result files)."""
    best = None
    for i, (v, sc) in enumerate(zip(values, scores)):
        key = (sc if math.isfinite(sc) else -math.inf, -abs(math.log(v / held)), -v)
        if best is None or key > best[0]:
            best = (key, i)
    return best[1]


@dataclass
class Detection:
    """A DPE detection: per-group scales and the sweep that chose them.

    bounds: pair boundaries of the groups; scales: the chosen scale per group; held: the scale of the other groups
    during the sweep; values: the scales each group took; table[g][k]: score with group g at values[k]
    evals: scorer calls made (the all-held configuration is scored once); elapsed: seconds
    """

    bounds: list[int]
    scales: list[float]
    held: float
    values: list[float]
    table: list[list[float]]
    evals: int
    elapsed: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def factors(self) -> torch.Tensor:
        """float32 [n_pairs]: the static form, lambda_i = s_g of pair i's group."""
        return pair_scales(self.bounds, self.scales)

    def to_dict(self) -> dict[str, Any]:
        return {"bounds": list(self.bounds), "scales": list(self.scales), "held": self.held,
                "values": list(self.values),
                "table": [[x if math.isfinite(x) else None for x in r] for r in self.table], "evals": self.evals,
                "elapsed": self.elapsed, **({"extra": self.extra} if self.extra else {})}


@dataclass(frozen=True)
class SweepPlan:
    """What a detection will score: group boundaries, the held scale, the values each group takes, and the number
    of distinct configurations (scorer calls: the all-held one is shared by every group)."""

    bounds: list[int]
    held: float
    values: list[float]
    calls: int

    @property
    def n_groups(self) -> int:
        return len(self.bounds) - 1


def _numbers(x: Any) -> Any:
    """A list given as text ("0.25,1,4", as a recipe's re-run line writes it) -> a list of numbers."""
    if isinstance(x, str):
        try:
            vals = [float(v) for v in x.strip("[]() ").split(",") if v.strip()]
        except ValueError:
            raise DPRoPEError(f"expected a number or a comma-separated list of numbers, got {x!r}") from None
        return int(vals[0]) if len(vals) == 1 and vals[0].is_integer() else vals
    return x


def sweep_plan(ctx: RopeContext, groups: int | Sequence[int] = DPE_GROUPS, held: float | None = None,
               multipliers: Sequence[float] | None = None, min_scale: float = 1.0) -> SweepPlan:
    """The sweep :func:`detect` will run with these options (no scorer call)."""
    groups, multipliers = _numbers(groups), _numbers(multipliers)
    if isinstance(multipliers, (int, float)):
        multipliers = [multipliers]
    if isinstance(groups, list):
        groups = [int(g) for g in groups]
    bounds = group_bounds(ctx.n_pairs, groups if isinstance(groups, int) else list(groups))
    held = round(float(held) if held is not None else held_scale(ctx), 9)  # as the values are rounded
    values = sweep_values(held, DPE_MULTIPLIERS if multipliers is None else tuple(multipliers), float(min_scale))
    shared = int(any(math.isclose(v, held, rel_tol=1e-9) for v in values))
    return SweepPlan(bounds, held, values, (len(bounds) - 1) * (len(values) - shared) + shared)


def detect(ctx: RopeContext, scorer: Scorer, *, groups: int | Sequence[int] = DPE_GROUPS, held: float | None = None,
           multipliers: Sequence[float] | None = None, min_scale: float = 1.0,
           progress: Callable[[dict[str, Any]], None] | None = None) -> Detection:
    """DPE's sweep: for each group in turn, score every value with the other groups at ``held`` (default
    2 L'/L); the best value per group is its scale.  Identical configurations are scored once.  A scorer result
    that is not finite counts as the worst.  ``progress(entry)`` after every scored configuration, entry =
    {"group", "value", "score", "evals", "total"}."""
    if not callable(scorer):
        raise DPRoPEError(f"scorer must be callable(pair_scales) -> float, got {type(scorer).__name__}")
    plan = sweep_plan(ctx, groups, held, multipliers, min_scale)
    bounds, held, values, n_groups = plan.bounds, plan.held, plan.values, plan.n_groups
    log.info("DPE detection: %d groups %s, held %.4g, values %s: %d scorer calls", n_groups, bounds, held, values,
             plan.calls)
    cache: dict[tuple[float, ...], float] = {}
    table: list[list[float]] = []
    t0 = time.time()
    for g in range(n_groups):
        row = []
        for v in values:
            key = tuple(held if k != g else v for k in range(n_groups))
            if key not in cache:
                try:
                    sc = float(scorer(pair_scales(bounds, key)))
                except (TypeError, ValueError) as e:
                    raise DPRoPEError(f"the scorer must return a number, got an error: {e}") from e
                if not math.isfinite(sc):
                    log.warning("scorer gave %r for group %d at %g; counted as the worst", sc, g, v)
                    sc = -math.inf
                cache[key] = sc
                if progress is not None:
                    progress({"group": g, "value": v, "score": sc, "evals": len(cache), "total": plan.calls})
            row.append(cache[key])
        table.append(row)
        log.info("group %d (pairs %d-%d): scores %s", g, bounds[g], bounds[g + 1] - 1,
                 ", ".join(f"{v:g}: {s:.4g}" for v, s in zip(values, row)))
    scales = [values[choose(values, row, held)] for row in table]
    return Detection(bounds, scales, held, values, table, len(cache), round(time.time() - t0, 3))
