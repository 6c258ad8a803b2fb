"""Extension methods: one registry from a name and options to per-pair factors, a temperature and a report.

Every method returns a :class:`~dprope.core.DPRoPEResult`: its factors, the attention temperature it pairs them
with, and the per-pair angle-distribution disturbance of what it chose (so formula methods are scored by the same
criterion as the DPRoPE family and a report can say why).  The CLI, recipes, the model card and the quality
benchmark read this registry; none keeps a list of its own.  Register your own with :func:`register_method`.

Families:
  formula  PI, NTK-aware, YaRN, Llama 3 (closed forms; YaRN with its temperature);
  dprope   the paper's method exactly (``dprope-paper``) and documented variants of it, each a change to one step
           of the paper's recipe: the temperature, a high-frequency guard, the angle density, the candidate set,
           the selection rule.  ``dprope`` is the project default: the variant that measured best (README).
  search   methods that measure the model, through a callable the pipeline supplies, so not standalone
           (``available_methods(standalone=True)`` leaves them out): LongRoPE's evolutionary search
           (``longrope-search``, :mod:`dprope.search`, a ``fitness``), the same objective descended by gradient
           (``dprope-fit``, :mod:`dprope.fit`, a ``loss_and_grad``) and DPE's needle sweep of per-group scales
           (``dpe``, :mod:`dprope.dpe`, a ``scorer``).
"""

from __future__ import annotations

import logging
import math
from typing import Any

from .constants import DEFAULT_BINS, DEFAULT_CANDIDATES
from .errors import DPRoPEError
from .registry import (  # noqa: F401
    DEFAULT_METHOD, TEMPERATURES, Method, _METHODS, available_methods, get_method, register_method, run_method,
    temperature, unregister_method)

log = logging.getLogger(__name__)

# the registry and the temperatures live in dprope.registry; their names are part of this module's API
# ----------------------------------------------------------------------------------------------- helpers
def _compute(ctx, **kw):
    from .core import compute_factors

    return compute_factors(ctx.inv_freq, rope_theta=ctx.rope_theta, head_dim=ctx.head_dim,
                           original_length=ctx.original_length, target_length=ctx.target_length, **kw)


def _candidates(value) -> list[str]:
    if isinstance(value, str):
        value = [c for c in value.split(",") if c.strip()]
    return [str(c).strip() for c in value]


def factor_grid(scale: float, steps: int) -> dict[str, Any]:
    """``steps`` + 1 uniform per-pair factors 1, ..., s (every pair the same), named by their value."""
    import numpy as np

    if int(steps) != steps or steps < 1:
        raise DPRoPEError(f"grid needs a whole number of steps >= 1, got {steps}")
    vals = np.linspace(1.0, float(scale), int(steps) + 1, dtype=np.float64)
    return {f"x{float(v):.4g}": float(v) for v in vals}


def _formula(candidate: str, temp: str = "none"):
    def fn(ctx, temperature: Any = temp, bins: int = DEFAULT_BINS):
        r = _compute(ctx, candidates=[candidate], bins=bins)
        r.temperature = _temp(temperature, ctx)
        return r

    return fn


def _temp(spec, ctx) -> float:
    return temperature(spec, ctx.scale, ctx.original_length)


# ----------------------------------------------------------------------------------------------- formulas
register_method("pi", "position interpolation: every pair slowed by s (Chen et al. 2023)", "formula",
                temperature="none", bins=DEFAULT_BINS)(_formula("interpolation"))
register_method("ntk", "NTK-aware static scaling, factor s^(2i/(d-2)) (bloc97 2023)", "formula",
                temperature="none", bins=DEFAULT_BINS)(_formula("ntk"))
register_method("yarn", "YaRN: ramp from extrapolation to PI (beta 32..1) with temperature 0.1 ln s + 1 "
                "(Peng et al. 2023)", "formula", temperature="yarn", bins=DEFAULT_BINS)(_formula("yarn", "yarn"))
register_method("llama3", "Llama 3.1 wavelength bands (low 1, high 4), no temperature", "formula",
                temperature="none", bins=DEFAULT_BINS)(_formula("llama3"))


# ----------------------------------------------------------------------------------------------- DPRoPE family
def _dprope(ctx, *, candidates=DEFAULT_CANDIDATES, select="argmin", bins=DEFAULT_BINS, density="sampled",
            guard=None, grid=0, temperature="none"):
    import numpy as np

    extra = {}
    if grid:
        extra = {name: np.full(ctx.n_pairs, v, dtype=np.float32)
                 for name, v in factor_grid(ctx.scale, grid).items()}
    r = _compute(ctx, candidates=_candidates(candidates), selection=select, bins=int(bins), density=density,
                 guard=None if guard in (None, 0, "none") else float(guard), extra_candidates=extra)
    r.temperature = _temp(temperature, ctx)
    r.params["grid"] = int(grid or 0)
    return r


_PAPER = dict(candidates=list(DEFAULT_CANDIDATES), select="argmin", bins=DEFAULT_BINS, density="sampled",
              guard=None, grid=0, temperature="none")


def _variant(name: str, summary: str, **changes):
    register_method(name, summary, "dprope", **{**_PAPER, **changes})(_dprope)


_variant("dprope-paper", "DPRoPE exactly as the paper and its reference code: extrapolation vs PI per pair, 360-bin "
         "sampled angle histograms, KL argmin, no temperature (Wu et al. 2024)")
_variant("dprope-temp", "dprope-paper + YaRN's attention temperature 0.1 ln s + 1", temperature="yarn")
_variant("dprope-guard", "dprope-paper + high-frequency guard: pairs turning >= 32 times in the original window "
         "stay extrapolated (YaRN's beta_fast)", guard=32)
_variant("dprope-coverage", "dprope-paper with the aliasing-free coverage density and the paper's threshold "
         "selection (t = 0.002 nats)", density="coverage", select="threshold:0.002")
_variant("dprope-grid", "DPRoPE over a grid of fractional factors 1..s (16 steps), coverage density, the mildest "
         "factor within 0.002 nats of the closest", density="coverage", grid=16, select="tolerance:0.002")


def _topn(ctx, *, n=None, **kw):
    """The paper's top-n selection; by default n = the share of pairs the paper interpolated on LLaMA2-7B
    (40 of 64 at s = 2, 32 of 64 at s = 4; linear in log2 s between, 32/64 beyond)."""
    if n is None:
        share = 40 / 64 if ctx.scale <= 2 else 32 / 64 if ctx.scale >= 4 else \
            40 / 64 - (8 / 64) * (math.log2(ctx.scale) - 1)
        n = int(round(share * ctx.n_pairs))
    return _dprope(ctx, **{**kw, "select": f"top-n:{int(n)}"})


register_method("dprope-topn", "dprope-paper with the paper's top-n selection (n: the paper's LLaMA2 share of "
                "interpolated pairs unless given)", "dprope", n=None,
                **{k: v for k, v in _PAPER.items() if k != "select"})(_topn)

def _ramp(ctx, *, low=1e-4, high=1e-2, bins=DEFAULT_BINS, density="coverage", temperature="none"):
    """Soft DPRoPE: a pair's interpolation weight grows with its extrapolation disturbance, log-linearly from
    ``low`` nats (weight 0, keep the frequency) to ``high`` nats (weight 1, PI); blended like YaRN blends
    frequencies, theta' = theta ((1 - w) + w / s).  The disturbance gain is made monotone from high to low
    frequency (a slower pair is never extrapolated more than a faster one)."""
    import numpy as np

    if not (0 < float(low) < float(high)):
        raise DPRoPEError(f"ramp needs 0 < low < high (nats), got low={low}, high={high}")
    r = _compute(ctx, candidates=list(DEFAULT_CANDIDATES), bins=int(bins), density=density)
    gain = np.maximum(r.per_pair["extrapolation"] - r.per_pair["interpolation"], 1e-30)
    gain = np.maximum.accumulate(gain)  # pairs go from high to low frequency
    w = np.clip(np.log(gain / float(low)) / math.log(float(high) / float(low)), 0, 1)
    f = (1.0 / ((1 - w) + w / ctx.scale)).astype(np.float32)
    f = np.where(w >= 1, np.float32(ctx.scale), np.where(w <= 0, np.float32(1), f)).astype(np.float32)
    # score the blend by the same criterion, for the report
    blended = _compute(ctx, candidates=[], extra_candidates={"ramp": f}, bins=int(bins), density=density)
    r.per_pair["ramp"] = blended.per_pair["ramp"]
    r.candidate_factors["ramp"] = f
    r.candidates = [*r.candidates, "ramp"]
    r.params["candidates"] = r.candidates
    r.chosen = ["extrapolation" if x <= 0 else "interpolation" if x >= 1 else "ramp" for x in w.tolist()]
    r.factors = np.ascontiguousarray(f)
    r.inv_freq = (r.base_inv_freq / r.factors).astype(np.float32)
    r.disturbance["ramp"] = float(r.per_pair["ramp"].mean())
    r.disturbance["selected"] = float(r.per_pair["ramp"].mean())
    r.params.update(selection=f"ramp:{low}..{high}", ramp_weight=[float(x) for x in w.tolist()])
    r.temperature = _temp(temperature, ctx)
    return r


register_method("dprope-ramp", "soft DPRoPE: interpolation weight log-linear in the extrapolation disturbance "
                "(1e-4 .. 1e-2 nats, coverage density), monotone in frequency", "dprope", low=1e-4, high=1e-2,
                bins=DEFAULT_BINS, density="coverage", temperature="none")(_ramp)

# The project default: soft DPRoPE with LongRoPE's temperature, chosen on Python's docs at 8k -> 16k among the
# variants above and confirmed on a second corpus (README, "Methods").  LongRoPE's temperature is also the one
# MLX-lm and ExLlamaV2 apply to every longrope config, so the default runs the same there.
register_method(DEFAULT_METHOD, "default: soft DPRoPE (dprope-ramp, 1e-4 .. 3e-2 nats) with LongRoPE's temperature "
                "sqrt(1 + ln s / ln L); the best measured variant (README)", "dprope", low=1e-4, high=3e-2,
                bins=DEFAULT_BINS, density="coverage", temperature="longrope")(_ramp)


# ----------------------------------------------------------------------------------------------- search family
def _longrope_search(ctx, *, fitness=None, state_path=None, progress=None, bins=DEFAULT_BINS, **config):
    """LongRoPE's evolutionary search (:func:`dprope.search.search`); the result's factors are the best individual,
    scored by the angle-distribution disturbance like every method; params["search"] holds the trace."""
    if fitness is None:
        raise DPRoPEError(
            "longrope-search needs a fitness: a callable fitness(factors, temperature) -> float (lower is better; "
            "LongRoPE uses the perplexity of the model with those factors on long documents) that runs the model. "
            "Pass it as an option, run_method('longrope-search', ctx, fitness=my_fitness), or use "
            "dprope.search.search(ctx, fitness, SearchConfig(...)); on the command line, `dprope extend MODEL OUT "
            "--method longrope-search --budget N --fitness proxy|ppl` builds one that runs the model")
    if not callable(fitness):
        raise DPRoPEError(f"fitness must be callable(factors, temperature) -> float, got {type(fitness).__name__}")
    from .search import search
    from .search_config import SearchConfig

    res = search(ctx, fitness, SearchConfig(**config), state_path=state_path, progress=progress)
    r = _compute(ctx, candidates=[], extra_candidates={"longrope-search": res.factors}, bins=int(bins))
    r.temperature = float(res.temperature)
    r.params["search"] = {"fitness": res.fitness, "evals": res.evals, "stopped": res.stopped, "trace": res.trace,
                          "config": res.config, "critical_pair": res.critical_pair, "elapsed": res.elapsed}
    return r


def _search_defaults() -> dict[str, Any]:
    from dataclasses import fields

    from .search_config import SearchConfig

    return {f.name: f.default for f in fields(SearchConfig)}


register_method("longrope-search", "LongRoPE's evolutionary search of per-pair factors (0.01 grid, monotone, "
                "1..1+s; from YaRN's shape and the DPRoPE default); needs a fitness callable that runs the model "
                "(Ding et al. 2024, microsoft/LongRoPE)", "search", fitness=None, state_path=None, progress=None,
                bins=DEFAULT_BINS, **_search_defaults())(_longrope_search)


# Options of the loss the pipeline builds for `dprope-fit` (convert/evaluate/fit.py): declared here so that recipes,
# --opt and the report carry them; the fit itself (dprope/fit.py) reads only the FitConfig fields.
FIT_LOSS_OPTIONS = dict(corpus=None, samples=1, length=None, score_from=None, batch=None, seed=0, dtype="auto",
                        device="auto", gradient_checkpointing=True, loss_chunk=1024, window=None, chunks=3, skip=0,
                        weights=None)


def _dprope_fit(ctx, *, loss_and_grad=None, state_path=None, progress=None, write_state=True, bins=DEFAULT_BINS,
                **options):
    """Per-pair factors fitted by gradient (:func:`dprope.fit.fit`); scored by the angle-distribution disturbance
    like every method; params["search"] holds the trace (the loss per step) in the form a search's takes."""
    if loss_and_grad is None:
        raise DPRoPEError(
            "dprope-fit needs loss_and_grad: a callable loss_and_grad(log_factors, temperature, step) -> (loss, "
            "gradient of the log-factors, gradient of the temperature or None) that runs the model with those "
            "factors on long text (the next-token loss past the original window). Pass it as an option, "
            "run_method('dprope-fit', ctx, loss_and_grad=my_loss, budget_steps=N), or use dprope.fit.fit(ctx, "
            "my_loss, FitConfig(...)); on the command line, `dprope extend MODEL OUT --method dprope-fit --budget "
            "STEPS` builds one that runs the model (convert/evaluate/fit.py)")
    if not callable(loss_and_grad):
        raise DPRoPEError(f"loss_and_grad must be callable, got {type(loss_and_grad).__name__}")
    from .fit import FitConfig, config_fields, fit

    names = set(config_fields())
    cfg = FitConfig(**{k: v for k, v in options.items() if k in names})
    res = fit(ctx, loss_and_grad, cfg, state_path=state_path, progress=progress, write_state=write_state)
    r = _compute(ctx, candidates=[], extra_candidates={"dprope-fit": res.factors}, bins=int(bins))
    r.temperature = float(res.temperature)
    r.params["search"] = {"kind": "yarn-scan" if cfg.space == "yarn" else "fit", "fitness": res.loss,
                          "evals": res.steps, "stopped": res.stopped,
                          "trace": res.trace, "config": res.config, "critical_pair": None, "elapsed": res.elapsed,
                          "best_step": res.best_step, "init": res.init, "fixed_pairs": res.fixed_pairs,
                          "pick": res.pick}
    return r


def _fit_defaults() -> dict[str, Any]:
    from dataclasses import fields

    from .fit import FitConfig

    return {f.name: f.default for f in fields(FitConfig)}


register_method("dprope-fit", "per-pair factors fitted by gradient, the weights frozen: Adam on the log-factors "
                "against the next-token loss past the original window on long text, from the default's factors, "
                "monotone within 1..1+s as LongRoPE's search; needs a loss callable that runs the model "
                "(LongRoPE's objective, Ding et al. 2024, descended instead of searched); window=W (chunks=N, "
                "default 3): short W-token windows with PoSE's skipped position ids (Zhu et al. 2024) instead of "
                "full-length ones, relative distances up to the target for a W-token pass, the temperature kept "
                "fixed (a short window cannot measure attention dilution) and the result the average of the "
                "iterates from average_from on (pick=average: each step reads other text); weights=span: "
                "distant chunks weighted by the positions they stand for; space=yarn: instead "
                "of one factor per pair, YaRN's factor and original_context_length chosen by the same loss (a "
                "scan of candidates on the same windows), for runtimes that read only YaRN (llama.cpp's qwen2, "
                "qwen3, gemma3)", "search",
                loss_and_grad=None, state_path=None, progress=None, write_state=True, bins=DEFAULT_BINS,
                **_fit_defaults(), **FIT_LOSS_OPTIONS)(_dprope_fit)


# ----------------------------------------------------------------------------------------------- DPE
# Options of the needle scorer the pipeline builds for `dpe` (convert/evaluate/needle.py): declared here so that recipes,
# --opt and the report carry them; the detection itself reads only groups, held, multipliers and min_scale.
DPE_SCORER_OPTIONS = dict(detect_with="runtime", window=None, samples=100, needles=4, length=None, sparse=False,
                          metric="accuracy", corpus=None, seed=0, max_new_tokens=128)


def _dpe(ctx, *, scorer=None, progress=None, groups=8, held=None, multipliers=None, min_scale=1.0,
         temperature="none", bins=DEFAULT_BINS, **scorer_options):
    """DPE's detection (:func:`dprope.dpe.detect`); the result's factors are its static form, lambda_i = s_g of pair
    i's group, scored by the angle-distribution disturbance like every method; params["dpe"] holds the sweep."""
    if scorer is None:
        raise DPRoPEError(
            "dpe needs a scorer: a callable scorer(pair_scales) -> float (higher is better; DPE uses the share of "
            "needles the model retrieves with those group scales) that runs the model. `dprope extend MODEL OUT "
            "--method dpe` builds one from the model; from Python pass run_method('dpe', ctx, scorer=my_scorer) "
            "(convert.evaluate.needle.needle_scorer builds DPE's)")
    from .dpe import default_window, detect

    det = detect(ctx, scorer, groups=groups, held=held,
                 multipliers=multipliers, min_scale=float(min_scale), progress=progress)
    r = _compute(ctx, candidates=[], extra_candidates={"dpe": det.factors}, bins=int(bins))
    r.temperature = _temp(temperature, ctx)
    window = scorer_options.get("window")
    r.params["dpe"] = {**det.to_dict(), "window": int(window) if window else default_window(ctx.original_length),
                       "detect_with": scorer_options.get("detect_with")}
    return r


register_method("dpe", "DPE's detection: a needle sweep of one position scale per group of pairs (8 groups, the "
                "others held at 2 L'/L), baked as static factors lambda = s_g (its closest bakeable form; the local "
                "window is runtime-only, see `validate --backend dpe`); needs a scorer that runs the model "
                "(Lu et al. 2025, LuLuLuyi/DPE)", "search", scorer=None, progress=None, groups=8, held=None,
                multipliers=None, min_scale=1.0, temperature="none", bins=DEFAULT_BINS,
                **DPE_SCORER_OPTIONS)(_dpe)


# ----------------------------------------------------------------------------------------------- given factors
def _load_factors(value: Any) -> list[float]:
    """Per-pair factors from a list, or from a JSON file: a list, {"long_factor": [...]} / {"factors": [...]}, or a
    Hugging Face config.json whose rope block carries long_factor (a baked or searched checkpoint)."""
    import json
    from pathlib import Path

    if isinstance(value, (list, tuple)):
        return [float(x) for x in value]
    p = Path(str(value))
    if not p.is_file():
        raise DPRoPEError(f"factors: long={value!r} is neither a list of per-pair factors nor a JSON file; pass "
                          "long=[1.0,1.0,...] or long=path/to/factors.json (a list, or a config.json with long_factor)")
    data = json.loads(p.read_text())
    if isinstance(data, dict):
        rope = data.get("rope_parameters") or data.get("rope_scaling") or data
        data = rope.get("long_factor") or rope.get("factors")
    if not isinstance(data, list):
        raise DPRoPEError(f"{p} holds no per-pair factors (a JSON list, or long_factor / factors)")
    return [float(x) for x in data]


def _file_provenance(value: Any) -> str | None:
    """Where a factors file says its factors came from: its "provenance" or "found_with" string, if any."""
    import json
    from pathlib import Path

    if isinstance(value, (list, tuple)) or not Path(str(value)).is_file():
        return None
    try:
        data = json.loads(Path(str(value)).read_text())
    except ValueError:
        return None
    if not isinstance(data, dict):
        return None
    text = data.get("provenance") or data.get("found_with")
    return str(text) if text else None


def _given(ctx, *, long=None, temperature="none", bins=DEFAULT_BINS, provenance=None):
    """Factors given as they are (a search's result found elsewhere, a paper's table), scored like every method.
    ``provenance``: where they came from (method, corpus, budget, seed, hardware), carried into the report and the
    model card; by default the file's own "provenance" or "found_with" string."""
    import numpy as np

    if long is None:
        raise DPRoPEError("factors needs long=[...] (one factor per rotary pair) or long=path/to/factors.json")
    vals = _load_factors(long)
    if len(vals) != ctx.n_pairs:
        raise DPRoPEError(f"factors: {len(vals)} values given, but this model has {ctx.n_pairs} rotary pairs "
                          f"(head_dim {ctx.head_dim} / 2): give one factor per pair")
    if not all(math.isfinite(v) and v > 0 for v in vals):
        raise DPRoPEError("factors must be finite numbers > 0 (1: the pair as pre-trained, s: slowed by s)")
    r = _compute(ctx, candidates=[], extra_candidates={"given": np.array(vals, dtype=np.float32)},
                 bins=int(bins))
    r.temperature = _temp(temperature, ctx)
    prov = provenance if provenance not in (None, "") else _file_provenance(long)
    if prov:
        r.params["provenance"] = str(prov)
    return r


register_method("factors", "per-pair factors given as they are (long=[...] or a JSON file / config.json with "
                "long_factor), e.g. a search's result from another machine; scored like every method", "given",
                long=None, temperature="none", bins=DEFAULT_BINS, provenance=None)(_given)
