"""Searched factors in the pipeline: run LongRoPE's evolutionary search (``dprope.search``) on a base checkpoint with
a fitness that runs the model (``convert.fitness``), resumably, and hand the best factors to the bake.

The search itself is pure and seeded; this module supplies what it needs from the outside world:

- the fitness callable (``fitness`` option: ``proxy`` or ``ppl``, with options, see ``convert.fitness``), the model
  loaded once;
- a budget (``budget_evals`` and/or ``budget_seconds``; ``dprope extend --budget N --time-budget S``): required, since
  LongRoPE's full search is about 1,300 evaluations and one full-length evaluation of a small model takes minutes on
  a CPU;
- a state file in the output's working area (``OUT.search/`` for ``dprope extend``, ``<run>/search/`` for ``dprope
  run``), named by what its values depend on (the model's content, the fitness and the search settings), so a run
  stopped by Ctrl-C, a crash or its budget continues where it stopped when the same command runs again and ends
  exactly as an uninterrupted run with the same seed; a larger budget continues a finished one;
- a progress bar with the best fitness so far, and the trace (best and median fitness per iteration) that the bake
  writes beside the factors report as ``search_trace.json`` and ``search_trace.png``.
"""

from __future__ import annotations

import json
import logging
import math
import statistics
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

import dprope

from .errors import ConvertError

if TYPE_CHECKING:
    from dprope import DPRoPEResult


log = logging.getLogger(__name__)

# the registered methods this module runs (a search that measures the model through a fitness callable)
SEARCH_METHODS = ("longrope-search",)
TRACE_JSON = "search_trace.json"
TRACE_PNG = "search_trace.png"
# plan options the pipeline supplies itself
_INTERNAL = ("progress",)


def is_search(method: str) -> bool:
    return method.lower() in SEARCH_METHODS


def work_dir_for(out: Path) -> Path:
    """The working area of ``dprope extend``'s search for output ``out``: ``OUT.search`` beside it."""
    out = Path(out)
    return out.with_name(out.name + ".search")


def check_options(method: str, options: Mapping[str, Any]) -> None:
    """Refuse, with one message naming the fix, a search plan that cannot run: no budget, an unknown fitness,
    settings the search rejects."""
    from dprope.search_config import SearchConfig

    from .fitness import FitnessSpec

    problems = []
    fit = options.get("fitness")
    if not callable(fit):
        try:
            FitnessSpec.parse(fit)
        except ConvertError as e:
            problems.append(str(e))
    be, bs = options.get("budget_evals"), options.get("budget_seconds")
    if be is None and bs is None:
        problems.append(f"{method} needs a budget: --budget N (fitness evaluations; LongRoPE's full search is about "
                        "1,300) and/or --time-budget SECONDS (recipes: method.options budget_evals / budget_seconds)")
    if be is not None and (isinstance(be, bool) or not isinstance(be, int) or be < 1):
        problems.append(f"budget_evals must be a whole number of evaluations >= 1, got {be!r}")
    if bs is not None and (isinstance(bs, bool) or not isinstance(bs, (int, float)) or not bs > 0):
        problems.append(f"budget_seconds must be a number of seconds > 0, got {bs!r}")
    for k in _INTERNAL:
        if options.get(k) is not None:
            problems.append(f"option {k} is supplied by the pipeline; leave it unset")
    try:
        SearchConfig(**_config_options(options))
    except (dprope.DPRoPEError, TypeError) as e:
        problems.append(str(e))
    if problems:
        raise ConvertError("; ".join(problems))


def _config_options(options: Mapping[str, Any]) -> dict[str, Any]:
    """The plan's options that are SearchConfig fields."""
    from dataclasses import fields

    from dprope.search_config import SearchConfig

    names = {f.name for f in fields(SearchConfig)}
    return {k: v for k, v in options.items() if k in names}


def _model_digest(path: Path, work: Path) -> str:
    """The base checkpoint by content (the files transformers reads), memoised in the working area."""
    from .digest import combine, run_memo

    memo = run_memo(work / "digests.json")
    try:
        return combine(memo.tree(path, recursive=False))
    finally:
        memo.save()


def state_path(work: Path, model_digest: str, fitness_identity: dict, config: dict, lengths: tuple) -> Path:
    """The state file for this search: named by everything its cached fitness values depend on, so another model,
    fitness or setting never resumes a state it does not own (budgets are not part of it: a larger one continues)."""
    from .digest import combine

    key = combine({"model": model_digest, "fitness": fitness_identity, "search": config, "lengths": list(lengths)})
    return Path(work) / f"state-{key[:16]}.json"


class _Tracked:
    """The fitness with a progress bar: evaluations, best so far."""

    def __init__(self, fitness, bar, best: float):
        self.fitness, self.bar, self.best = fitness, bar, best

    def __call__(self, factors, temperature) -> float:
        v = self.fitness(factors, temperature)
        if math.isfinite(v) and v < self.best:
            self.best = v
        self.bar.update(1)
        self.bar.set_postfix_str(f"best {self.best:.4f}, last {v:.4f}")
        return v


def run_search(src: Any, plan: Any, work: Path, *, progress: bool = True, fitness=None) -> DPRoPEResult:
    """Run (or resume) the plan's search (a convert.bake.BakePlan) on ``src`` (a convert.source.Source) with its state in ``work``; the best factors as a result the
    bake takes (``bake(..., result=...)``).  ``fitness``: a ready callable instead of the plan's named one (tests,
    benchmarks that already loaded the model).  Ctrl-C leaves the state saved and re-raises."""
    from tqdm.auto import tqdm

    from dprope.freqs import RopeContext
    from dprope.methods import run_method
    from dprope.search import load_state
    from dprope.search_config import SearchConfig

    from .fitness import FitnessSpec, make_fitness

    if not is_search(plan.method):
        raise ConvertError(f"method '{plan.method}' is not a search; searches: {', '.join(SEARCH_METHODS)}")
    check_options(plan.method, plan.options)
    spec = plan.spec_for(src.spec)
    if plan.target_length <= spec.original_length:
        raise ConvertError(f"target length {plan.target_length} is not longer than the model's window "
                           f"{spec.original_length}: pass --target-length above it")
    opts = dict(plan.options)
    given_fitness = opts.pop("fitness", None)
    for k in (*_INTERNAL, "state_path"):
        opts.pop(k, None)
    cfg = SearchConfig(**_config_options(opts))
    work = Path(work)
    work.mkdir(parents=True, exist_ok=True)
    if fitness is None:
        fspec = FitnessSpec.parse(given_fitness)
        log.info("loading %s for the %s fitness", src.path, fspec.kind)
        fitness = make_fitness(fspec, src.path, spec, plan.target_length)
        label, identity = fspec.text(), fitness.identity()
    else:
        label = getattr(fitness, "label", None) or getattr(fitness, "__qualname__", type(fitness).__name__)
        identity = fitness.identity() if hasattr(fitness, "identity") else {"callable": label}
    given_state = plan.options.get("state_path")
    state = Path(given_state) if given_state else state_path(
        work, _model_digest(src.path, work), identity, cfg.search_fields(),
        (spec.original_length, plan.target_length))
    old = load_state(state)
    done = int(old["evals"]) if old else 0
    best = min((v for v in (old or {}).get("cache", {}).values() if v is not None), default=math.inf)
    if old:
        log.info("resuming the search from %s (%d evaluations done)", state, done)
    planned = cfg.population + cfg.iterations * (cfg.mutations + cfg.crossovers)
    total = min(planned, cfg.budget_evals) if cfg.budget_evals is not None else planned
    bar = tqdm(total=total, initial=min(done, total), desc=f"{plan.method} ({label.split(':')[0]})", unit="eval",
               disable=not progress, dynamic_ncols=True)
    if math.isfinite(best):
        bar.set_postfix_str(f"best {best:.4f}")
    tracked = _Tracked(fitness, bar, best)

    def on_iteration(entry: dict) -> None:
        bar.set_description(f"{plan.method} it {entry['iteration']}/{cfg.iterations}")

    ctx = RopeContext(spec.inv_freq, spec.rope_theta, spec.original_length, plan.target_length)
    try:
        r = run_method(plan.method, ctx, **opts, fitness=tracked, state_path=str(state), progress=on_iteration)
    except KeyboardInterrupt:
        log.warning("search interrupted; its state is in %s: run the same command again to resume", state)
        raise
    except dprope.DPRoPEError as e:
        raise ConvertError(str(e)) from None
    finally:
        bar.close()
    r.params["options"].update(fitness=label if given_fitness is None or callable(given_fitness) else given_fitness,
                               state_path=None, progress=None)
    seconds = list(getattr(fitness, "seconds", []) or [])
    r.params["search"].update(fitness_spec=label, fitness_identity=identity, state_file=state.name,
                              seconds_per_eval=statistics.median(seconds) if seconds else None)
    log.info("search: best fitness %.6g after %d evaluations (%s)", r.params["search"]["fitness"],
             r.params["search"]["evals"], r.params["search"]["stopped"])
    return r


# ------------------------------------------------------------------------------------------- the trace
def write_trace(out: Path, result: DPRoPEResult, plot: bool = True) -> list[Path]:
    """search_trace.json (best and median fitness per iteration, and how the search ran) and search_trace.png in
    ``out``, for a result that carries a search (``params["search"]``); nothing otherwise."""
    s = result.params.get("search")
    if not s:
        return []
    out = Path(out)
    data = {"method": result.method, "fitness": s.get("fitness_spec"), "best_fitness": s.get("fitness"),
            "evals": s.get("evals"), "stopped": s.get("stopped"), "seconds_per_eval": s.get("seconds_per_eval"),
            "temperature": result.temperature, "critical_pair": s.get("critical_pair"),
            "config": s.get("config"), "trace": s.get("trace", [])}
    (out / TRACE_JSON).write_text(json.dumps(data, indent=1, default=str) + "\n")
    made = [out / TRACE_JSON]
    if plot:
        plot_trace(data, out / TRACE_PNG)
        made.append(out / TRACE_PNG)
    return made


def plot_trace(data: dict, path: Path) -> None:
    """Best and median fitness per iteration (log scale), evaluations on a second axis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    trace = data.get("trace") or []
    fig, ax = plt.subplots(figsize=(7, 4))
    if trace:
        it = [e["iteration"] for e in trace]
        finite = lambda xs: [x if x is not None and math.isfinite(x) else float("nan") for x in xs]  # noqa: E731
        ax.plot(it, finite([e["best"] for e in trace]), "o-", label="best")
        ax.plot(it, finite([e["median"] for e in trace]), "s--", label="median")
        ax.set_yscale("log")
        ax.legend()
    else:
        ax.text(0.5, 0.5, "stopped before the first iteration finished", ha="center", va="center",
                transform=ax.transAxes)
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax.set_xlabel("iteration (0: the initial population)")
    ax.set_ylabel(f"fitness ({data.get('fitness') or 'lower is better'})")
    ax.set_title(f"{data.get('method')}: best {data.get('best_fitness'):.4g} after {data.get('evals')} evaluations "
                 f"({data.get('stopped')})", fontsize=9)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
