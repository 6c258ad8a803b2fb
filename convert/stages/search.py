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

``dprope-fit`` (``dprope.fit``: the same objective descended by gradient) runs the same way through :func:`run_fit`:
its loss callable (``convert.evaluate.fit``), a budget of steps (``budget_steps``; ``--budget STEPS``), a resumable
state file named the same way, a progress bar with the loss, and its trace (the loss per step).

Both spread over processes under a torch.distributed group (``torchrun``): the search scores each generation's
individuals on every rank and gathers them on rank 0, the fit shards its text over the ranks and all-reduces its
gradient; rank 0 bakes.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

import dprope

from convert.errors import ConvertError
from convert.evaluate.fitness import (  # noqa: F401
    _FIT_INTERNAL, _INTERNAL, FIT_METHOD, SEARCH_METHODS, _config_options, check_options, is_search)
from convert.names import TRACE_JSON, TRACE_PNG  # noqa: F401

if TYPE_CHECKING:
    from dprope import DPRoPEResult


log = logging.getLogger(__name__)


def _median(seconds: list[float]) -> float | None:
    import statistics  # 4-7 ms: not on the path of the commands that never search

    return statistics.median(seconds) if seconds else None


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

    def _seen(self, v: float) -> float:
        if math.isfinite(v) and v < self.best:
            self.best = v
        self.bar.update(1)
        self.bar.set_postfix_str(f"best {self.best:.4f}, last {v:.4f}")
        return v

    def __call__(self, factors, temperature) -> float:
        return self._seen(self.fitness(factors, temperature))


class _TrackedMany(_Tracked):
    """The same over a fitness that scores a generation at once (several processes, PopulationFitness)."""

    def evaluate_many(self, items) -> list[float]:
        return [self._seen(v) for v in self.fitness.evaluate_many(items)]


def search_flag_options(method: str, budget=None, time_budget=None, fitness=None, seed=None) -> dict:
    """The method options `dprope extend`'s search flags set: --budget is the evaluations of LongRoPE's search
    (budget_evals) and the steps of the fit (budget_steps); --time-budget, seconds of either; --fitness, the
    search's fitness (the fit's loss is its own); --seed, either's seed.  Flags given to a method that measures
    nothing are refused."""
    flags = {"budget": budget, "time_budget": time_budget, "fitness": fitness, "seed": seed}
    given = {k: v for k, v in flags.items() if v is not None}
    if not given:
        return {}
    if not is_search(method):
        raise ConvertError(f"--budget, --time-budget, --fitness and --seed apply to search methods "
                           f"(--method {' or '.join(SEARCH_METHODS)}), not to '{method}'")
    if method.lower() == FIT_METHOD:
        if "fitness" in given:
            raise ConvertError("--fitness applies to longrope-search; dprope-fit descends its own loss (the "
                               "next-token loss past the original window): choose its text with --opt corpus=FILE "
                               "and --opt samples=N")
        names = {"budget": "budget_steps", "time_budget": "budget_seconds", "seed": "seed"}
    else:
        names = {"budget": "budget_evals", "time_budget": "budget_seconds", "fitness": "fitness", "seed": "seed"}
    return {names[k]: v for k, v in given.items()}


def _worker_done(rank: int, worker_exit: bool):
    """What a rank other than 0 does once its part of a distributed search or fit is over: only rank 0 bakes, so
    under a launcher (torchrun) the process ends here, successfully; a caller that set the group up itself (a test)
    gets None."""
    log.info("rank %d: done; rank 0 writes the result", rank)
    if worker_exit:
        raise SystemExit(0)
    return None


def run_search(src: Any, plan: Any, work: Path, *, progress: bool = True, fitness=None, loss=None,
               worker_exit: bool = True) -> DPRoPEResult | None:
    """Run (or resume) the plan's search (a convert.stages.bake.BakePlan) on ``src`` (a convert.formats.checkpoint.Source) with its state in ``work``; the best factors as a result the
    bake takes (``bake(..., result=...)``).  ``fitness``: a ready callable instead of the plan's named one (tests,
    benchmarks that already loaded the model).  Ctrl-C leaves the state saved and re-raises.  ``dprope-fit`` goes
    to :func:`run_fit` (``loss``: a ready loss callable).

    Several processes (a torch.distributed group, e.g. ``torchrun --nproc-per-node N -m convert.cli extend ...``):
    each loads the model; LongRoPE's search scores each generation spread over the ranks (rank 0 searches and
    gathers, convert.evaluate.fitness.PopulationFitness) and ends exactly as one process would with the same seed;
    rank 0 returns the result, the other ranks end (``worker_exit``) or return None."""
    if plan.method.lower() == FIT_METHOD:
        return run_fit(src, plan, work, progress=progress, loss=loss, worker_exit=worker_exit)
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
    from convert.evaluate.fitness import PopulationFitness, process_group, serve_fitness

    rank, world = process_group()
    if fitness is None:
        fspec = FitnessSpec.parse(given_fitness)
        log.info("loading %s for the %s fitness", src.path, fspec.kind)
        fitness = make_fitness(fspec, src.path, spec, plan.target_length)
        label, identity = fspec.text(), fitness.identity()
    else:
        label = getattr(fitness, "label", None) or getattr(fitness, "__qualname__", type(fitness).__name__)
        identity = fitness.identity() if hasattr(fitness, "identity") else {"callable": label}
    if rank != 0:
        scored = serve_fitness(fitness, rank, world)
        log.info("rank %d scored %d individuals", rank, scored)
        return _worker_done(rank, worker_exit)
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
    spread = PopulationFitness(fitness, rank, world) if world > 1 else None
    tracked = _TrackedMany(spread, bar, best) if spread is not None else _Tracked(fitness, bar, best)

    def on_iteration(entry: dict) -> None:
        bar.set_description(f"{plan.method} it {entry['iteration']}/{cfg.iterations}")

    ctx = RopeContext(spec.inv_freq, spec.rope_theta, spec.original_length, plan.target_length)
    try:
        r = run_method(plan.method, ctx, **opts, fitness=tracked, state_path=str(state), progress=on_iteration)
        if spread is not None:
            spread.close()
    except KeyboardInterrupt:
        log.warning("search interrupted; its state is in %s: run the same command again to resume", state)
        raise
    except dprope.DPRoPEError as e:
        if spread is not None:
            spread.close()  # the other ranks stop waiting
        raise ConvertError(str(e)) from None
    finally:
        bar.close()
    r.params["options"].update(fitness=label if given_fitness is None or callable(given_fitness) else given_fitness,
                               state_path=None, progress=None)
    seconds = list(getattr(fitness, "seconds", []) or [])
    r.params["search"].update(fitness_spec=label, fitness_identity=identity, state_file=state.name,
                              seconds_per_eval=_median(seconds))
    log.info("search: best fitness %.6g after %d evaluations (%s)", r.params["search"]["fitness"],
             r.params["search"]["evals"], r.params["search"]["stopped"])
    return r


# ------------------------------------------------------------------------------------------- the gradient fit
def run_fit(src: Any, plan: Any, work: Path, *, progress: bool = True, loss=None,
            worker_exit: bool = True) -> DPRoPEResult | None:
    """Run (or resume) the plan's gradient fit (``dprope-fit``, :mod:`dprope.fit`) on ``src`` with its state in
    ``work``, like :func:`run_search`: the model loaded once (convert/evaluate/fit.py), a state file named by the
    model's content, the loss's text and the fit's settings (budgets aside: a larger one continues a finished
    fit), a progress bar with the loss, and the trace (the loss per step) in the result for the bake to write as
    ``search_trace.json`` / ``search_trace.png``.  ``loss``: a ready loss callable instead of one built from the
    plan (tests).  Under several processes every rank fits on its share of the text, rank 0 writes the state and
    returns the result; the other ranks end (``worker_exit``) or return None.  Ctrl-C leaves the state saved and
    re-raises."""
    from tqdm.auto import tqdm

    from dprope.fit import FitConfig, config_fields
    from dprope.freqs import RopeContext, check_target_length
    from dprope.methods import FIT_LOSS_OPTIONS, run_method

    from convert.evaluate.fit import describe_device, make_fit_loss
    from convert.evaluate.fitness import process_group

    spec = plan.spec_for(src.spec)
    check_options(plan.method, plan.options, plan.target_length, spec.original_length)
    check_target_length(plan.target_length, spec.original_length, ConvertError)
    opts = {k: v for k, v in plan.options.items() if k not in _FIT_INTERNAL}
    cfg = FitConfig(**{k: v for k, v in opts.items() if k in set(config_fields())})
    rank, world = process_group()
    work = Path(work)
    work.mkdir(parents=True, exist_ok=True)
    if loss is None:
        loss = make_fit_loss(src.path, spec, plan.target_length, opts, cfg.fit_temperature, rank, world)
    label = loss.label() if hasattr(loss, "label") else getattr(loss, "__qualname__", type(loss).__name__)
    identity = loss.identity() if hasattr(loss, "identity") else {"callable": label}
    given_state = plan.options.get("state_path")
    state = None
    if rank == 0:
        state = Path(given_state) if given_state else state_path(
            work, _model_digest(src.path, work), identity, cfg.fit_fields(),
            (spec.original_length, plan.target_length))
    if world > 1:  # every rank reads the same state file; rank 0 alone writes it
        import torch.distributed as dist

        box = [None if state is None else str(state)]
        dist.broadcast_object_list(box, src=0)
        state = Path(box[0])
    from dprope.search import load_state

    old = load_state(state)
    done = int(old["step"]) if old else 0
    if old and rank == 0:
        log.info("resuming the fit from %s (%d steps done)", state, done)
    total = cfg.budget_steps
    bar = tqdm(total=total, initial=min(done, total) if total else done, desc=f"{plan.method} ({label.split(':')[0]})",
               unit="step", disable=not progress or rank != 0, dynamic_ncols=True)
    if old and old.get("best"):
        bar.set_postfix_str(f"best {old['best']['loss']:.4f}")

    def on_step(entry: dict) -> None:
        bar.update(1)
        bar.set_postfix_str(f"loss {entry['loss']:.4f}, best {entry['best']:.4f}")

    ctx = RopeContext(spec.inv_freq, spec.rope_theta, spec.original_length, plan.target_length)
    try:
        r = run_method(plan.method, ctx, **opts, loss_and_grad=loss, state_path=str(state), progress=on_step,
                       write_state=rank == 0)
    except KeyboardInterrupt:
        log.warning("fit interrupted; its state is in %s: run the same command again to resume", state)
        raise
    except dprope.DPRoPEError as e:
        raise ConvertError(str(e)) from None
    finally:
        bar.close()
    if rank != 0:
        return _worker_done(rank, worker_exit)
    r.params["options"].update(state_path=None, progress=None, loss_and_grad=None, write_state=True)
    s = r.params["search"]
    seconds = list(getattr(loss, "seconds", []) or [])
    tokens = loss.tokens_per_step() if hasattr(loss, "tokens_per_step") else None
    where = describe_device(loss.model) if hasattr(loss, "model") else "the caller's loss"
    s.update(fitness_spec=label, fitness_identity=identity, state_file=state.name,
             seconds_per_eval=_median(seconds), tokens_per_step=tokens,
             processes=world, device=where)
    init = s.get("init") or {}
    loss_opts = {k: opts.get(k) for k in FIT_LOSS_OPTIONS}
    if s.get("kind") == "yarn-scan":
        best = s["trace"][s["best_step"]]
        own = init.get("loss")
        r.params["provenance"] = (
            f"YaRN fitted by the loss (dprope-fit, space=yarn): {s['evals']} candidates (original_context_length "
            f"L_o, factor = target / L_o; stopped: {s['stopped']}) scored by the next-token loss past position "
            f"{getattr(loss, 'score_from', '?')} ({label}, steps 0..{cfg.scan_steps - 1}, "
            + ("each at YaRN's temperature 1 + 0.1 ln f" if init.get("scan_temperature") == "yarn"
               else f"temperature {float(init.get('scan_temperature') or 'nan'):.4f} for all")
            + f"): best L_o {best['original_length']}, factor "
            f"{best['factor']:.4g}, loss {s['fitness']:.4f}"
            + (f" (llama.cpp's own YaRN at this target: {own:.4f})" if own is not None else "")
            + f", seed {loss_opts.get('seed')}, {world} process(es) on {where}, {s['elapsed'] / 60:.1f} min")
        log.info("YaRN scan: best loss %.6g at L_o %d after %d candidates", s["fitness"], best["original_length"],
                 s["evals"])
        return r
    r.params["provenance"] = (
        f"fitted by gradient (dprope-fit): {s['evals']} Adam steps (lr {cfg.lr:g}, stopped: {s['stopped']}) on the "
        f"next-token loss past position {getattr(loss, 'score_from', '?')} ({label}), from {init.get('method')}'s "
        f"factors (loss {init.get('loss') if init.get('loss') is None else format(init['loss'], '.4f')} -> "
        f"{s['fitness']:.4f}{', the mean over the averaged steps' if s.get('pick') == 'average' else ''}), "
        + (f"the average of the iterates from step {s['best_step']} on, " if s.get("pick") == "average" else "")
        + f"seed {loss_opts.get('seed')}, {world} process(es) on {where}, {s['elapsed'] / 60:.1f} min")
    log.info("fit: best loss %.6g after %d steps (%s)", s["fitness"], s["evals"], s["stopped"])
    return r


# ------------------------------------------------------------------------------------------- the trace
