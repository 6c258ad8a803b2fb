"""Searched factors in the pipeline: run LongRoPE's evolutionary search (``dprope.search``) on a base checkpoint with
a fitness that runs the model (``convert.evaluate.fitness``), resumably, and hand the best factors to the bake.

The search itself is pure and seeded; this module supplies what it needs from the outside world:

- the fitness callable (``fitness`` option: ``proxy`` or ``ppl``, with options, see ``convert.evaluate.fitness``), the model
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

import logging
import math
import statistics
from pathlib import Path
from typing import TYPE_CHECKING, Any

import dprope

from convert.errors import ConvertError
from convert.evaluate.fitness import _INTERNAL, SEARCH_METHODS, _config_options, check_options, is_search  # noqa: F401
from convert.evaluate.report import plot_trace, write_trace  # noqa: F401
from convert.names import TRACE_JSON, TRACE_PNG  # noqa: F401

if TYPE_CHECKING:
    from dprope import DPRoPEResult


log = logging.getLogger(__name__)

def work_dir_for(out: Path) -> Path:
    """The working area of ``dprope extend``'s search for output ``out``: ``OUT.search`` beside it."""
    out = Path(out)
    return out.with_name(out.name + ".search")


def _model_digest(path: Path, work: Path) -> str:
    """The base checkpoint by content (the files transformers reads), memoised in the working area."""
    from convert.io.files import combine, run_memo

    memo = run_memo(work / "digests.json")
    try:
        return combine(memo.tree(path, recursive=False))
    finally:
        memo.save()


def state_path(work: Path, model_digest: str, fitness_identity: dict, config: dict, lengths: tuple) -> Path:
    """The state file for this search: named by everything its cached fitness values depend on, so another model,
    fitness or setting never resumes a state it does not own (budgets are not part of it: a larger one continues)."""
    from convert.io.files import combine

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
    """Run (or resume) the plan's search (a convert.stages.bake.BakePlan) on ``src`` (a convert.formats.checkpoint.Source) with its state in ``work``; the best factors as a result the
    bake takes (``bake(..., result=...)``).  ``fitness``: a ready callable instead of the plan's named one (tests,
    benchmarks that already loaded the model).  Ctrl-C leaves the state saved and re-raises."""
    from tqdm.auto import tqdm

    from dprope.freqs import RopeContext, check_target_length
    from dprope.methods import run_method
    from dprope.search import load_state
    from dprope.search_config import SearchConfig

    from convert.evaluate.fitness import FitnessSpec, make_fitness

    if not is_search(plan.method):
        raise ConvertError(f"method '{plan.method}' is not a search; searches: {', '.join(SEARCH_METHODS)}")
    check_options(plan.method, plan.options)
    spec = plan.spec_for(src.spec)
    check_target_length(plan.target_length, spec.original_length, ConvertError)
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
