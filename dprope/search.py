"""LongRoPE's evolutionary search of per-pair factors, as its code does it (microsoft/LongRoPE, ``evolution/``).

An individual is one factor lambda_i per rotary pair on a grid (0.01), monotone non-decreasing from the fast pairs
to the slow ones, within [1, 1 + s]; optionally an attention temperature (cos/sin multiplier) as one more gene.
Internally genes are whole grid units (factor = units * grid), so equality, duplicates and the grid are exact.

One run (LongRoPE's defaults, ``evolution/default_hyper_params/dim_mono_llama.json``; the loop,
``evolution/algorithms/genetic_base.py``; the operators, ``evolution/algorithms/dim_mono.py``): an initial
population of ``population`` individuals (YaRN's shape lambda_i = s (1 - m_i) + m_i with YaRN's ramp m, the
DPRoPE default's factors, and mutants of these), then ``iterations`` times: keep the best ``parents``, add ``mutations`` mutants and ``crossovers`` children of
random parents.  Every individual is evaluated once (a cache keyed by its genes; duplicates are rejected).

LongRoPE2 mode (Shang et al. 2025; microsoft/LongRoPE ``dim_mono.py``, ``critical_dim`` and ``ntk_left``): only
the pairs from the critical pair cd = ceil(log_b(L / 2 pi) d / 2) - 1 on are genes; the pairs below follow
lambda_i = lambda_cd ** (i / cd).  Differences from that code, on purpose: factors need only be non-decreasing
(its LongRoPE2 version asks strictly increasing, which the YaRN shape's plateaus are not), the last pair's bound is
1 + s (not the previous pair + 4), and a mutation that finds nothing new gives up after ``max_tries`` passes.

The fitness is a callable the caller supplies, ``fitness(factors: float32 [n_pairs], temperature: float) ->
float``, lower is better (LongRoPE: perplexity on long documents).  This module never runs a model.

A run is deterministic under ``seed`` (a numpy Generator; never the global RNG) and resumable: its state (the
generator, the population, the individuals waiting for evaluation, every evaluated individual with its fitness,
the trace) is written atomically as JSON (individuals as comma-joined grid units; "cache": every evaluated one
with its fitness, null for a non-finite one; "population": the current one, best first; "pending": the ones made
but not all evaluated yet) to ``state_path`` after evaluations and after every iteration; the same call with
that file continues where it stopped and ends exactly as an uninterrupted run.  The file I/O is only in
:func:`save_state` / :func:`load_state`.
"""

from __future__ import annotations

import json
import logging
import math
import os
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from .errors import DPRoPEError
from .freqs import RopeContext
from .search_config import SearchConfig

log = logging.getLogger(__name__)

Fitness = Callable[[torch.Tensor, float], float]
Key = tuple  # the genes of one individual (grid units), hashable

STATE_VERSION = 1


@dataclass
class SearchResult:
    """The best individual of a search and how the search went.

    factors: float32 [n_pairs]; temperature: its cos/sin multiplier; fitness: its fitness (lower is better)
    trace: per completed iteration (0: the initial population) {"iteration", "best", "median", "evals"}
    evals: fitness evaluations made; stopped: "done", "budget_evals" or "budget_seconds"
    critical_pair: LongRoPE2's cd (None outside LongRoPE2 mode)
    """

    factors: torch.Tensor
    temperature: float
    fitness: float
    trace: list[dict[str, Any]]
    evals: int
    stopped: str
    config: dict[str, Any]
    critical_pair: int | None = None
    elapsed: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: factors as a list, the trace as is."""
        return {"factors": [float(x) for x in self.factors.tolist()], "temperature": self.temperature,
                "fitness": self.fitness, "trace": [dict(e) for e in self.trace], "evals": self.evals,
                "stopped": self.stopped, "config": dict(self.config), "critical_pair": self.critical_pair,
                "elapsed": self.elapsed, **({"extra": self.extra} if self.extra else {})}


# ----------------------------------------------------------------------------------------------- the space
@dataclass(frozen=True)
class Space:
    """Where individuals live: genes are grid units, ``n_genes`` factors (+ one temperature gene).

    lo, hi: factor bounds in units; t_lo, t_hi: temperature bounds in units; cd: first searched pair (0 unless
    LongRoPE2); n_pairs: pairs of the model.
    """

    n_pairs: int
    cd: int
    lo: int
    hi: int
    grid: float
    temperature: bool
    t_lo: int = 0
    t_hi: int = 0
    fixed_temperature: float = 1.0
    longrope2: bool = False

    @property
    def n_genes(self) -> int:
        return self.n_pairs - self.cd

    def expand(self, key: Sequence[int]) -> tuple[torch.Tensor, float]:
        """Factors float32 [n_pairs] and temperature of an individual."""
        g = np.asarray(key[: self.n_genes], dtype=np.float64) * self.grid
        if self.cd:
            # LongRoPE2: pairs below the critical pair follow lambda_cd ** (i / cd)
            below = g[0] ** (np.arange(self.cd, dtype=np.float64) / self.cd)
            g = np.concatenate([below, g])
        t = key[self.n_genes] * self.grid if self.temperature else self.fixed_temperature
        return torch.from_numpy(g.astype(np.float32)), float(t)

    def valid(self, key: Sequence[int]) -> bool:
        """Genes within bounds and monotone non-decreasing (grid membership holds by construction)."""
        g = key[: self.n_genes]
        if len(key) != self.n_genes + int(self.temperature):
            return False
        if g[0] < self.lo or g[-1] > self.hi or any(b < a for a, b in zip(g, g[1:])):
            return False
        return not self.temperature or self.t_lo <= key[-1] <= self.t_hi


def critical_pair(ctx: RopeContext) -> int:
    """LongRoPE2's critical pair cd = ceil(log_b(L / 2 pi) d / 2) - 1, clipped to [0, n_pairs - 1].

    Without ``rope_theta``: the number of pairs whose wavelength is shorter than L, minus one (the same for plain
    RoPE)."""
    L, d = ctx.original_length, ctx.head_dim
    if ctx.rope_theta is not None:
        cd = math.ceil(math.log(L / (2 * math.pi)) / math.log(float(ctx.rope_theta)) * d / 2) - 1
    else:
        wavelen = 2 * math.pi / ctx.inv_freq.astype(np.float64)
        cd = int((wavelen < L).sum()) - 1
    return min(max(cd, 0), ctx.n_pairs - 1)


def make_space(ctx: RopeContext, config: SearchConfig) -> Space:
    from .registry import temperature as temperature_of

    g = float(config.grid)
    lo, hi = math.ceil(1.0 / g - 1e-9), math.floor((1.0 + ctx.scale) / g + 1e-9)
    t_lo = math.ceil(config.temperature_range[0] / g - 1e-9)
    t_hi = math.floor(config.temperature_range[1] / g + 1e-9)
    if config.search_temperature and t_hi < t_lo:
        raise DPRoPEError(f"temperature_range {config.temperature_range} holds no point of the grid {g}")
    fixed = temperature_of(config.temperature, ctx.scale, ctx.original_length)
    cd = critical_pair(ctx) if config.longrope2 else 0
    return Space(ctx.n_pairs, cd, lo, hi, g, bool(config.search_temperature), t_lo, t_hi, fixed,
                 bool(config.longrope2))


def is_valid(factors: torch.Tensor | Sequence[float], scale: float, grid: float = 0.01,
             critical: int | None = None, tol: float = 1e-5) -> bool:
    """Monotone non-decreasing, on the grid and within [1, 1 + s]; float [n_pairs].

    critical: LongRoPE2's cd: then only pairs >= cd must be on the grid, and the pairs below must equal
    lambda_cd ** (i / cd)."""
    f = torch.as_tensor(factors, dtype=torch.float64).flatten()
    if f.numel() == 0 or not bool(torch.isfinite(f).all()):
        return False
    if float(f.min()) < 1 - tol or float(f.max()) > 1 + scale + tol or bool((f[1:] < f[:-1] - tol).any()):
        return False
    cd = int(critical or 0)
    units = f[cd:] / grid
    if bool(((units - units.round()).abs() > 1e-3).any()):
        return False
    if cd:
        want = f[cd] ** (torch.arange(cd, dtype=torch.float64) / cd)
        if not torch.allclose(f[:cd], want, rtol=1e-5, atol=1e-6):
            return False
    return True


# ----------------------------------------------------------------------------------------------- operators
def mutate(key: Sequence[int], space: Space, rng: np.random.Generator, prob: float) -> Key:
    """One pass of LongRoPE's mutation: each gene with probability ``prob`` is resampled uniformly on the grid
    between its neighbours' current values (the bounds at the ends), so the child stays monotone
    (microsoft/LongRoPE, ``evolution/algorithms/dim_mono.py``, ``mutate``).  The temperature gene, when searched,
    is resampled in its whole range with the same probability."""
    g = list(key)
    n = space.n_genes
    for i in range(n):
        if rng.random() < prob:
            left = g[i - 1] if i > 0 else space.lo
            right = g[i + 1] if i + 1 < n else space.hi
            g[i] = int(rng.integers(left, right + 1))
    if space.temperature and rng.random() < prob:
        g[n] = int(rng.integers(space.t_lo, space.t_hi + 1))
    return tuple(int(x) for x in g)


def new_mutant(parent: Sequence[int], space: Space, rng: np.random.Generator, cfg: SearchConfig,
               seen: set) -> Key | None:
    """LongRoPE's mutation as a whole: passes of :func:`mutate` on the same child until it is new (not in
    ``seen``) and valid; None after ``max_tries`` passes (LongRoPE loops until it succeeds)."""
    child = tuple(parent)
    for _ in range(cfg.max_tries):
        child = mutate(child, space, rng, cfg.mutation_prob)
        if child not in seen and space.valid(child):
            return child
    return None


def crossover(a: Sequence[int], b: Sequence[int], space: Space, rng: np.random.Generator, prob: float,
              seen: set, tries: int = 20) -> Key | None:
    """LongRoPE's crossover: start from parent ``a`` and copy parent ``b``'s genes one at a time, each with
    probability ``prob`` per pass over the genes (LongRoPE: 0.3 x 0.5), returning the first state that is new and
    valid (monotone); None when the parents are equal or ``tries`` passes find none (microsoft/LongRoPE,
    ``evolution/algorithms/dim_mono.py``, ``crossover``).  The caller falls back to a mutation of ``a``."""
    if tuple(a) == tuple(b):
        return None
    child = list(a)
    for _ in range(tries):
        for i in range(len(child)):
            if rng.random() < prob:
                child[i] = int(b[i])
                k = tuple(int(x) for x in child)
                if k in seen or not space.valid(k):
                    continue
                return k
    return None


def breed(parents: Sequence[Key], space: Space, rng: np.random.Generator, cfg: SearchConfig,
          seen: set) -> list[Key]:
    """One iteration's children (microsoft/LongRoPE, ``evolution/algorithms/genetic_base.py``): ``mutations``
    mutants of random parents, then ``crossovers`` children of two distinct random parents (the better one
    first), each new (not in ``seen``, which grows) and valid.  A crossover that finds no child falls back to a
    mutant of its first parent; a child that cannot be made new is dropped."""
    children: list[Key] = []
    for _ in range(cfg.mutations):
        child = new_mutant(parents[int(rng.integers(len(parents)))], space, rng, cfg, seen)
        if child is None:
            log.debug("no new mutant in %d tries", cfg.max_tries)
            continue
        seen.add(child)
        children.append(child)
    for _ in range(cfg.crossovers):
        if len(parents) >= 2:
            i, j = sorted(int(x) for x in rng.choice(len(parents), size=2, replace=False))
        else:
            i = j = 0
        child = crossover(parents[i], parents[j], space, rng, cfg.crossover_prob, seen, cfg.max_crossover_try)
        if child is None:
            child = new_mutant(parents[i], space, rng, cfg, seen)
        if child is None:
            continue
        seen.add(child)
        children.append(child)
    return children


# ----------------------------------------------------------------------------------------------- initial population
def longrope_yarn_shape(ctx: RopeContext) -> np.ndarray:
    """LongRoPE's YaRN-shaped initial factors lambda_i = s (1 - m_i) + m_i, m YaRN's ramp (1: keep the
    frequency), float32 [n_pairs] (microsoft/LongRoPE, ``evolution/``; the ramp: :func:`dprope.candidates.yarn_ramp`)."""
    from .candidates import yarn_ramp

    m = yarn_ramp(ctx).astype(np.float64)
    return (ctx.scale * (1 - m) + m).astype(np.float32)


def to_key(factors: torch.Tensor | Sequence[float], temperature: float, space: Space) -> Key:
    """The nearest individual: factors (float [n_pairs]) rounded to the grid, clipped to the bounds and made
    monotone (a running maximum); in LongRoPE2 mode only the pairs from cd on are kept."""
    f = np.asarray(torch.as_tensor(factors, dtype=torch.float64).flatten().tolist(), dtype=np.float64)
    if f.size != space.n_pairs:
        raise DPRoPEError(f"an initial individual needs {space.n_pairs} factors, got {f.size}")
    units = np.clip(np.rint(f[space.cd:] / space.grid), space.lo, space.hi).astype(np.int64)
    units = np.maximum.accumulate(units)
    key = [int(u) for u in units]
    if space.temperature:
        key.append(int(min(max(round(temperature / space.grid), space.t_lo), space.t_hi)))
    return tuple(key)


def seed_individuals(ctx: RopeContext, space: Space, cfg: SearchConfig) -> list[tuple[str, Key]]:
    """The named initial individuals from ``cfg.init_methods`` ("yarn": LongRoPE's YaRN shape with the fixed
    temperature; a registered method: its factors and temperature), without duplicates."""
    from .registry import run_method

    out: list[tuple[str, Key]] = []
    for name in cfg.init_methods:
        if name.lower() == "yarn":
            f, t = longrope_yarn_shape(ctx), space.fixed_temperature
        elif name.lower() in ("longrope-search",):
            raise DPRoPEError("init_methods cannot contain the search itself")
        else:
            r = run_method(name, ctx)
            f, t = r.factors, r.temperature
        key = to_key(f, t, space)
        if key not in [k for _, k in out]:
            out.append((name, key))
    return out


def initial_population(ctx: RopeContext, config: SearchConfig, rng: np.random.Generator,
                       space: Space | None = None) -> list[Key]:
    """LongRoPE's initial population: the seeds of ``init_methods``, then mutants of them (in turn) until
    ``population`` individuals, each distinct (fewer when no new mutant can be made)."""
    space = space or make_space(ctx, config)
    pop = [k for _, k in seed_individuals(ctx, space, config)][: config.population]
    seen = set(pop)
    seeds = list(pop)
    misses = 0
    while len(pop) < config.population and misses < len(seeds):
        child = new_mutant(seeds[(len(pop) + misses) % len(seeds)], space, rng, config, seen)
        if child is None:
            misses += 1
            continue
        seen.add(child)
        pop.append(child)
    return pop


# ----------------------------------------------------------------------------------------------- state file
def save_state(path: str | os.PathLike, state: dict[str, Any]) -> None:
    """Write ``state`` as JSON atomically (a temporary file in the same folder, then os.replace)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    try:
        with open(tmp, "w") as fh:
            json.dump(state, fh, separators=(",", ":"))
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def load_state(path: str | os.PathLike) -> dict[str, Any] | None:
    """The state written by :func:`save_state`, or None when there is none."""
    path = Path(path)
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise DPRoPEError(f"search state {path} is unreadable ({e}); delete it to start afresh") from None


class StateSaver:
    """Writes a run's state ``st`` (:func:`save_state`) with ``st["elapsed"]`` the seconds run so far, counted over
    resumed runs; as a context manager it writes on leaving the block, on an exception (Ctrl-C included) as on a
    normal end.  ``write`` False: it keeps the time, never writes (the ranks of a distributed run other than the
    first).  Used by the search and both kinds of fit (dprope/fit.py)."""

    def __init__(self, path, st: dict[str, Any], write: bool = True):
        self.path, self.st, self.write = path, st, write
        self.started = time.monotonic() - float(st["elapsed"])

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def save(self) -> None:
        self.st["elapsed"] = self.elapsed()
        if self.path is not None and self.write:
            save_state(self.path, self.st)

    def __enter__(self) -> "StateSaver":
        return self

    def __exit__(self, *exc) -> bool:
        self.save()
        return False


# ----------------------------------------------------------------------------------------------- the search
def _kstr(key: Key) -> str:
    return ",".join(str(x) for x in key)


def _kparse(s: str) -> Key:
    return tuple(int(x) for x in s.split(","))


def _fit(v: Any) -> float:
    return math.inf if v is None else float(v)


def _ctx_dict(ctx: RopeContext) -> dict[str, Any]:
    return {"n_pairs": ctx.n_pairs, "original_length": ctx.original_length, "target_length": ctx.target_length,
            "rope_theta": ctx.rope_theta, "inv_freq": [float(x) for x in ctx.inv_freq.tolist()]}


def search(ctx: RopeContext, fitness: Fitness, config: SearchConfig | None = None,
           state_path: str | os.PathLike | None = None,
           progress: Callable[[dict[str, Any]], None] | None = None) -> SearchResult:
    """Run (or resume, when ``state_path`` holds a state) LongRoPE's evolutionary search.

    fitness(factors: float32 [n_pairs], temperature: float) -> float, lower is better; non-finite values count as
    +inf.  A fitness with a method ``evaluate_many([(factors, temperature), ...]) -> [float, ...]`` gets each
    generation's individuals in one call (in the order one-at-a-time calls would take them, so the search ends the
    same), for a fitness that scores them in parallel.  progress(entry) is called with each trace entry.  An
    exception from ``fitness`` (Ctrl-C included) saves the state and propagates; call again with the same
    ``state_path`` to continue.
    """
    cfg = config or SearchConfig()
    space = make_space(ctx, cfg)
    st = load_state(state_path) if state_path is not None else None
    if st is not None:
        if st.get("version") != STATE_VERSION:
            raise DPRoPEError(f"search state {state_path} has version {st.get('version')}, not {STATE_VERSION}")
        if st["config"] != cfg.search_fields() or st["ctx"] != _ctx_dict(ctx):
            raise DPRoPEError(f"search state {state_path} belongs to another search (its model, lengths or "
                              "settings differ); use another state path or delete it")
        rng = np.random.default_rng()
        rng.bit_generator.state = st["rng"]
        log.info("resuming search from %s: %d iterations done, %d evaluations", state_path,
                 len(st["trace"]) - 1, st["evals"])
    else:
        rng = np.random.default_rng(cfg.seed)
        st = {"version": STATE_VERSION, "rng": rng.bit_generator.state, "config": cfg.search_fields(),
              "ctx": _ctx_dict(ctx), "evals": 0, "elapsed": 0.0, "cache": {}, "population": [], "survivors": [],
              "pending": None, "trace": []}
    cache: dict[str, float | None] = st["cache"]
    # a fitness that scores several individuals at once (spread over processes): each generation goes to it whole
    many = getattr(fitness, "evaluate_many", None)
    many = many if callable(many) else None
    # the saved st["rng"] is the generator as of the last finished generation step: the only consistent point (the
    # generator is used only to make individuals, never while evaluating them)
    saver = StateSaver(state_path, st)
    since_save = 0

    def fit_of(k: str) -> float:
        return _fit(cache[k])

    stopped = "done"
    with saver:
        while True:
            if st["pending"] is None:
                if not st["trace"]:
                    pending = initial_population(ctx, cfg, rng, space)
                    st["survivors"] = []
                elif len(st["trace"]) > cfg.iterations:
                    break
                else:
                    pop = st["population"]
                    survivors = pop[: cfg.parents]
                    seen = {_kparse(k) for k in cache} | {_kparse(k) for k in pop}
                    pending = breed([_kparse(k) for k in survivors], space, rng, cfg, seen)
                    st["survivors"] = survivors
                st["pending"] = [_kstr(k) for k in pending]
                st["rng"] = rng.bit_generator.state
                saver.save()
            todo = [k for k in dict.fromkeys(st["pending"]) if k not in cache]
            while todo:
                if cfg.budget_evals is not None and st["evals"] >= cfg.budget_evals:
                    stopped = "budget_evals"
                    break
                if cfg.budget_seconds is not None and saver.elapsed() >= cfg.budget_seconds:
                    stopped = "budget_seconds"
                    break
                if many is None:
                    batch = todo[:1]
                    values = [fitness(*space.expand(_kparse(batch[0])))]
                else:  # the rest of the generation at once, within the evaluation budget
                    room = len(todo) if cfg.budget_evals is None else cfg.budget_evals - st["evals"]
                    batch = todo[:room]
                    values = list(many([space.expand(_kparse(k)) for k in batch]))
                for k, v in zip(batch, values):
                    v = float(v)
                    cache[k] = v if math.isfinite(v) else None
                    st["evals"] += 1
                    since_save += 1
                todo = todo[len(batch):]
                if since_save >= cfg.save_every:
                    saver.save()
                    since_save = 0
            if stopped != "done":
                break
            # the new population: survivors + children, best first (ties: by genes, for determinism)
            pop = list(dict.fromkeys(st["survivors"] + st["pending"]))
            pop.sort(key=lambda k: (fit_of(k), _kparse(k)))
            st["population"] = pop
            st["pending"] = None
            vals = [fit_of(k) for k in pop]
            entry = {"iteration": len(st["trace"]), "best": vals[0], "median": float(statistics.median(vals)),
                     "evals": st["evals"], "size": len(pop)}
            st["trace"].append(entry)
            log.info("search iteration %d: best %.6g, median %.6g, %d evaluations", entry["iteration"],
                     entry["best"], entry["median"], entry["evals"])
            saver.save()
            since_save = 0
            if progress is not None:
                progress(dict(entry))
    if not cache:
        raise DPRoPEError("the search stopped before evaluating any individual (budget too small)")
    best = min(cache, key=lambda k: (fit_of(k), _kparse(k)))
    factors, temp = space.expand(_kparse(best))
    trace = [dict(e) for e in st["trace"]]
    if stopped != "done":
        log.info("search stopped (%s) after %d evaluations; best %.6g", stopped, st["evals"], fit_of(best))
    return SearchResult(factors=factors, temperature=temp, fitness=fit_of(best), trace=trace, evals=st["evals"],
                        stopped=stopped, config=cfg.to_dict(), critical_pair=space.cd if space.longrope2 else None,
                        elapsed=float(st["elapsed"]))
