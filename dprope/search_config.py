"""Settings of LongRoPE's evolutionary search (:mod:`dprope.search`); no torch import, so the method registry can
list them cheaply."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any

from .errors import DPRoPEError


@dataclass
class SearchConfig:
    """LongRoPE's search settings (defaults from microsoft/LongRoPE, ``evolution/``).

    population, parents, mutations, crossovers, iterations: sizes per iteration (64, 32, 16, 16, 40)
    mutation_prob: per-gene resampling probability of a mutation (0.3)
    crossover_prob: per-gene probability of taking the second parent's gene (0.15)
    max_crossover_try: passes of a crossover over the genes before it falls back to a mutation (20)
    max_tries: mutation passes before giving up on a new individual (LongRoPE retries forever)
    grid: factor step (0.01); longrope2: search only from the critical pair on (LongRoPE2)
    search_temperature: the temperature is a gene in ``temperature_range`` (on ``grid``); else ``temperature``
    temperature: the fixed temperature: a spec of :func:`dprope.methods.temperature` (LongRoPE's by default)
    init_methods: sources of the initial individuals: "yarn" (LongRoPE's YaRN shape) or any registered method
    budget_evals / budget_seconds: stop after this many evaluations / seconds of this search (None: no limit;
        seconds add up over resumed runs); budgets may change between a run and its resumption
    save_every: write the state after this many evaluations (and always after an iteration and on an exception)
    """

    population: int = 64
    parents: int = 32
    mutations: int = 16
    crossovers: int = 16
    iterations: int = 40
    mutation_prob: float = 0.3
    crossover_prob: float = 0.15
    max_crossover_try: int = 20
    max_tries: int = 1000
    seed: int = 0
    grid: float = 0.01
    longrope2: bool = False
    search_temperature: bool = False
    temperature: Any = "longrope"
    temperature_range: tuple[float, float] = (1.0, 1.5)
    init_methods: tuple[str, ...] = ("yarn", "dprope")
    budget_evals: int | None = None
    budget_seconds: float | None = None
    save_every: int = 1

    # fields that only limit a run; a state may be resumed under other values
    RUN_LIMITS = ("budget_evals", "budget_seconds", "save_every")

    def __post_init__(self) -> None:
        if isinstance(self.init_methods, str):
            self.init_methods = tuple(m.strip() for m in self.init_methods.split(",") if m.strip())
        self.init_methods = tuple(self.init_methods)
        tr = self.temperature_range
        if isinstance(tr, str):
            tr = [x for x in tr.replace("..", ",").split(",") if x.strip()]
        if len(tr) != 2:
            raise DPRoPEError(f"temperature_range needs (low, high), got {self.temperature_range!r}")
        self.temperature_range = (float(tr[0]), float(tr[1]))
        for name in ("population", "parents", "iterations", "max_crossover_try", "max_tries", "save_every"):
            v = getattr(self, name)
            if isinstance(v, bool) or int(v) != v or v < (0 if name == "iterations" else 1):
                raise DPRoPEError(f"search option {name} must be a whole number >= 1, got {v!r}")
        for name in ("mutations", "crossovers"):
            if int(getattr(self, name)) < 0:
                raise DPRoPEError(f"search option {name} must be >= 0, got {getattr(self, name)!r}")
        if self.parents > self.population:
            raise DPRoPEError(f"parents ({self.parents}) cannot exceed the population ({self.population})")
        for name in ("mutation_prob", "crossover_prob"):
            if not 0 <= float(getattr(self, name)) <= 1:
                raise DPRoPEError(f"search option {name} must be a probability in [0, 1]")
        if not (math.isfinite(self.grid) and 0 < self.grid <= 1):
            raise DPRoPEError(f"grid must be a step in (0, 1], got {self.grid!r}")
        lo, hi = self.temperature_range
        if not (0 < lo <= hi):
            raise DPRoPEError(f"temperature_range must be 0 < low <= high, got {self.temperature_range}")
        if not self.init_methods:
            raise DPRoPEError("init_methods needs at least one source of initial individuals, e.g. yarn")

    def search_fields(self) -> dict[str, Any]:
        """The fields that define the search (a resumed state must have the same)."""
        d = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in self.RUN_LIMITS}
        d["temperature_range"] = list(d["temperature_range"])
        d["init_methods"] = list(d["init_methods"])
        return d

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["temperature_range"] = list(d["temperature_range"])
        d["init_methods"] = list(d["init_methods"])
        return d
