"""Per-pair factors fitted by gradient with the model's weights frozen (``dprope-fit``).

LongRoPE (Ding et al. 2024, "LongRoPE: Extending LLM Context Window Beyond 2 Million Tokens", microsoft/LongRoPE)
finds one factor lambda_i per rotary pair by an evolutionary search whose fitness is the model's perplexity on
long documents: about 1,300 full-length forward passes.  That perplexity is a smooth function of the factors (pair i
rotates by p / (lambda_i b^(2i/d)) at position p, and the model reads the cosine and sine of that angle), so the same
objective can be descended by gradient instead: one forward and one backward pass per step, the weights frozen, the
gradient reaching the factors through the rotary embedding alone.

What is fitted: x_i = ln lambda_i (one number per pair) and, when ``fit_temperature``, y = ln t (the cos/sin
multiplier; otherwise t stays fixed: the init method's, or a temperature spec of :func:`dprope.registry.temperature`).
Optimiser: Adam (Kingma & Ba 2015) on x (and y) at a constant learning rate, each step followed by a projection
onto the constraints LongRoPE's search keeps (microsoft/LongRoPE ``evolution/algorithms/dim_mono.py``): factors
within [low, high] (LongRoPE: [1, 1 + s]) and, with ``monotone``, non-decreasing in the pair index (a slower pair
is never extrapolated more than a faster one).  In log space both constraints are a monotone cone cut by a box with
the same bounds for every coordinate, whose Euclidean projection is the isotonic regression (pool adjacent
violators) clipped to the box.  The start is a registered method's factors (``init``; the project default
``dprope`` unless given), projected.  The fastest pairs (those turning at least ``guard`` times inside the original
window, YaRN's beta_fast = 32 by default) keep the start's factor: the loss oscillates in their factor on a scale far
below any useful step.

The loss is a callable the caller supplies, ``loss_and_grad(log_factors, temperature, step) -> (loss,
grad_log_factors, grad_temperature)``: log_factors float64 [n_pairs], the loss a float (LongRoPE's objective: the
model's next-token loss on long text, here on the tokens past the original window; convert/evaluate/fit.py builds
it), the gradient of the loss with respect to the log-factors [n_pairs] and to the temperature (a float, or None
when the temperature is not fitted); ``step`` numbers the evaluations from 0, so a loss that draws its text per step
draws it reproducibly.  This module never runs a model.

The result (``pick``): "best", the evaluated point with the lowest loss (the start included: a fit never hands back
factors its own loss rates worse than where it began), for a loss that reads the same text every step; or "average",
the mean of the evaluated points from step ``average_from`` on (Polyak & Juditsky 1992's iterate averaging), for a
loss that draws new text every step (short windows, or a batch of a larger pool): there the losses of two steps are
measured on different tokens, so their minimum picks the easiest text, not the best factors, while the average of the
iterates cancels the steps' noise.  The constraints are convex (a box and a monotone cone), so the average keeps
them.  A run is resumable: its state (the parameters, Adam's moments, the best
point, the trace) is written atomically as JSON after every ``save_every`` steps and on an exception (Ctrl-C
included); the same call with that file continues where it stopped and, for a deterministic loss, ends exactly as an
uninterrupted run (floats round-trip through JSON exactly).  A budget is required: ``budget_steps`` and/or
``budget_seconds``; it may change between a run and its resumption (a larger one continues a finished run).

Nothing here imports torch at module level, so the method registry can list the settings cheaply.
"""

from __future__ import annotations

import logging
import math
import re
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Callable, Sequence

from .errors import DPRoPEError

log = logging.getLogger(__name__)

STATE_VERSION = 1

# loss_and_grad(log_factors float64 [n_pairs], temperature, step) -> (loss, grad_log_factors, grad_temperature | None)
LossAndGrad = Callable[[Any, float, int], tuple]

_BOUND = re.compile(r"^\s*(?:(?P<a>\d+(?:\.\d*)?)\s*\+\s*)?(?P<k>\d+(?:\.\d*)?)?\s*\*?\s*s\s*$")


def bound_value(spec: Any, scale: float) -> float | None:
    """A factor bound: None / "none" (no bound), a number, or an expression in the scale s: "s", "1+s" (LongRoPE's
    upper bound), "1.25s" / "1.25*s", "1+0.5s"."""
    if spec is None or (isinstance(spec, str) and spec.strip().lower() in ("none", "")):
        return None
    if isinstance(spec, bool):
        raise DPRoPEError(f"a factor bound must be a number or an expression in s such as 1+s, got {spec!r}")
    if isinstance(spec, (int, float)):
        v = float(spec)
    else:
        text = str(spec)
        m = _BOUND.match(text)
        if m:
            v = float(m["a"] or 0.0) + float(m["k"] or 1.0) * float(scale)
        else:
            try:
                v = float(text)
            except ValueError:
                raise DPRoPEError(f"a factor bound must be none, a number, or an expression in the scale s such as "
                                  f"1+s or 1.25s, got {spec!r}") from None
    if not (math.isfinite(v) and v > 0):
        raise DPRoPEError(f"a factor bound must be finite and > 0, got {spec!r} = {v}")
    return v


@dataclass
class FitConfig:
    """Settings of a gradient fit of per-pair factors (:func:`fit`).

    init: the registered method whose factors (and temperature) start the fit (the project default ``dprope``)
    lr: Adam's step size on the log-factors (and the log-temperature); betas, eps: Adam's other settings
    monotone: factors non-decreasing in the pair index (LongRoPE's constraint)
    guard: the leading pairs that turn at least this many times inside the original window keep the init's factor
        (None: every pair is fitted).  Their loss oscillates with a period of about 2 pi / (p theta_i) in ln lambda_i
        at distance p, far below any useful step, and they see every angle in training already; 32 is YaRN's
        beta_fast (Peng et al. 2023), past which YaRN too leaves a pair as it is
    low, high: factor bounds (numbers, expressions in s such as "1+s" or "1.25s", or None); LongRoPE: 1 .. 1 + s
    temperature: "init" (the init method's) or a spec of :func:`dprope.registry.temperature`; the fixed temperature,
        or the start of a fitted one
    fit_temperature: fit ln t too, within ``temperature_range``
    budget_steps / budget_seconds: stop after this many loss-and-gradient evaluations / seconds (None: no limit;
        seconds add up over resumed runs; one of the two is required)
    pick: "best" (the evaluated point of lowest loss), "average" (the mean of the evaluated points from step
        ``average_from`` on; for a loss that draws its text per step) or "auto": "average" when ``loss_and_grad``
        says it is stochastic (an attribute ``stochastic`` that is true), else "best"; see the module docstring
    average_from: the first step averaged (with ``pick`` "average"); a fraction < 1 of ``budget_steps`` (of the
        steps made, without a step budget; 0.5: the second half) or a step number
    save_every: write the state after this many steps (and always on an exception and at the end)
    """

    init: str = "dprope"
    lr: float = 0.02
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    monotone: bool = True
    guard: float | None = 32.0
    low: Any = 1.0
    high: Any = "1+s"
    temperature: Any = "init"
    fit_temperature: bool = False
    temperature_range: tuple[float, float] = (1.0, 1.5)
    budget_steps: int | None = None
    budget_seconds: float | None = None
    save_every: int = 1
    pick: str = "auto"
    average_from: float = 0.5
    space: str = "pairs"
    scan_steps: int = 2
    scan_points: int = 9
    scan_temperature: str = "yarn"

    # fields of the YaRN space alone: a per-pair fit's state keeps its name without them
    YARN_FIELDS = ("scan_steps", "scan_points", "scan_temperature")

    # fields that only limit a run or choose among its points; a state may be resumed under other values
    RUN_LIMITS = ("budget_steps", "budget_seconds", "save_every", "pick", "average_from")  # the path is the same

    def __post_init__(self) -> None:
        def pair(v, name):
            if isinstance(v, str):
                v = [x for x in v.replace("..", ",").split(",") if x.strip()]
            if len(v) != 2:
                raise DPRoPEError(f"fit option {name} needs two numbers, got {v!r}")
            return (float(v[0]), float(v[1]))

        self.betas = pair(self.betas, "betas")
        self.temperature_range = pair(self.temperature_range, "temperature_range")
        if not all(0 <= b < 1 for b in self.betas):
            raise DPRoPEError(f"fit option betas must be two numbers in [0, 1), got {self.betas}")
        for name in ("lr", "eps"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not (math.isfinite(v) and v > 0):
                raise DPRoPEError(f"fit option {name} must be a number > 0, got {v!r}")
        bs = self.budget_steps
        if bs is not None and (isinstance(bs, bool) or not isinstance(bs, int) or bs < 1):
            raise DPRoPEError(f"budget_steps must be a whole number of steps >= 1, got {bs!r}")
        sec = self.budget_seconds
        if sec is not None and (isinstance(sec, bool) or not isinstance(sec, (int, float)) or not sec > 0):
            raise DPRoPEError(f"budget_seconds must be a number of seconds > 0, got {sec!r}")
        se = self.save_every
        if isinstance(se, bool) or not isinstance(se, int) or se < 1:
            raise DPRoPEError(f"fit option save_every must be a whole number >= 1, got {se!r}")
        if self.pick not in ("auto", "best", "average"):
            raise DPRoPEError(f"fit option pick must be auto, best or average, got {self.pick!r}")
        af = self.average_from
        if isinstance(af, bool) or not isinstance(af, (int, float)) or not (af >= 0 and math.isfinite(af)):
            raise DPRoPEError(f"fit option average_from must be a step number or a fraction of the steps >= 0, "
                              f"got {af!r}")
        lo, hi = self.temperature_range
        if not (0 < lo <= hi):
            raise DPRoPEError(f"temperature_range must be 0 < low <= high, got {self.temperature_range}")
        g = self.guard
        if g is not None and (isinstance(g, bool) or not isinstance(g, (int, float)) or not g > 0):
            raise DPRoPEError(f"fit option guard must be a number of turns > 0 (or none), got {g!r}")
        for name in ("monotone", "fit_temperature"):
            if not isinstance(getattr(self, name), bool):
                raise DPRoPEError(f"fit option {name} must be true or false, got {getattr(self, name)!r}")
        bound_value(self.low, 2.0)
        bound_value(self.high, 2.0)
        if self.space not in ("pairs", "yarn"):
            raise DPRoPEError(f"fit option space must be pairs (one factor per pair) or yarn (YaRN's factor and "
                              f"original_context_length, for runtimes that read only YaRN), got {self.space!r}")
        if self.scan_temperature not in ("yarn", "fixed"):
            raise DPRoPEError(f"fit option scan_temperature must be yarn (each candidate at YaRN's own 1 + 0.1 ln f, "
                              f"what the runtime applies) or fixed (all at the init's), got {self.scan_temperature!r}")
        for name, least in (("scan_steps", 1), ("scan_points", 2)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < least:
                raise DPRoPEError(f"fit option {name} must be a whole number >= {least}, got {v!r}")
        if not isinstance(self.init, str) or not self.init.strip():
            raise DPRoPEError(f"fit option init must name a registered method, got {self.init!r}")
        from .registry import get_method, temperature

        get_method(self.init)  # an unknown name: the registry's message, listing the known ones
        if self.temperature not in (None, "init"):
            temperature(self.temperature, 2.0, 4096)  # a bad spec: its message

    def fit_fields(self) -> dict[str, Any]:
        """The fields that define the fit (a resumed state must have the same)."""
        d = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in self.RUN_LIMITS}
        if self.space == "pairs":
            for k in ("space", *self.YARN_FIELDS):
                d.pop(k)
        d["betas"] = list(d["betas"])
        d["temperature_range"] = list(d["temperature_range"])
        return d

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["betas"] = list(d["betas"])
        d["temperature_range"] = list(d["temperature_range"])
        return d


def config_fields() -> tuple[str, ...]:
    return tuple(f.name for f in fields(FitConfig))


@dataclass
class FitResult:
    """The best point of a fit and how the fit went.

    factors: float32 [n_pairs]; temperature: its cos/sin multiplier; loss: its loss (lower is better; with pick
    "average", the mean loss of the averaged steps); best_step: that point's step (with "average": the first step
    averaged)
    trace: per evaluation {"step", "loss", "best", "temperature", "grad_norm"}
    steps: loss-and-gradient evaluations made; stopped: "budget_steps" or "budget_seconds"
    init: {"method", "loss"}: where the fit started and that point's loss
    """

    factors: Any
    temperature: float
    loss: float
    trace: list[dict[str, Any]]
    steps: int
    stopped: str
    config: dict[str, Any]
    best_step: int
    init: dict[str, Any] = field(default_factory=dict)
    elapsed: float = 0.0
    fixed_pairs: int = 0
    pick: str = "best"  # how the result was chosen among the evaluated points: "best" or "average"

    def to_dict(self) -> dict[str, Any]:
        return {"factors": [float(x) for x in self.factors.tolist()], "temperature": self.temperature,
                "loss": self.loss, "trace": [dict(e) for e in self.trace], "steps": self.steps,
                "stopped": self.stopped, "config": dict(self.config), "best_step": self.best_step,
                "init": dict(self.init), "elapsed": self.elapsed, "fixed_pairs": self.fixed_pairs, "pick": self.pick}


# ----------------------------------------------------------------------------------------------- constraints
def isotonic(values: Sequence[float]) -> list[float]:
    """The non-decreasing sequence closest to ``values`` in the least-squares sense: pool adjacent violators (Ayer
    et al. 1955), each block replaced by its mean."""
    blocks: list[list[float]] = []  # [sum, count]
    for v in values:
        blocks.append([float(v), 1.0])
        while len(blocks) > 1 and blocks[-2][0] / blocks[-2][1] > blocks[-1][0] / blocks[-1][1]:
            s, c = blocks.pop()
            blocks[-1][0] += s
            blocks[-1][1] += c
    out: list[float] = []
    for s, c in blocks:
        out.extend([s / c] * int(c))
    return out


def project(log_factors: Sequence[float], lo: float | None, hi: float | None, monotone: bool,
            fixed: int = 0) -> list[float]:
    """The point of {x : lo <= x_i <= hi, and x non-decreasing when ``monotone``} nearest ``log_factors``
    (Euclidean): the isotonic regression clipped to [lo, hi] (the bounds being the same for every coordinate, the
    clip keeps the order and the composition is the exact projection).  ``fixed``: the first ``fixed`` coordinates
    stay as given (and are taken to keep the constraints already); the rest are projected with the last fixed one
    as a further lower bound when ``monotone``."""
    head = [float(v) for v in log_factors[:fixed]]
    rest = log_factors[fixed:]
    x = isotonic(rest) if monotone else [float(v) for v in rest]
    lo_ = -math.inf if lo is None else lo
    if monotone and head:
        lo_ = max(lo_, head[-1])
    hi_ = math.inf if hi is None else hi
    return head + [min(max(v, lo_), hi_) for v in x]


def guarded_pairs(ctx, guard: float | None) -> int:
    """How many leading pairs turn at least ``guard`` times inside the original window (they keep the init's
    factor)."""
    if guard is None:
        return 0
    n = 0
    for w in ctx.inv_freq.tolist():
        if float(w) * ctx.original_length / (2 * math.pi) < float(guard):
            break
        n += 1
    return n


def log_bounds(cfg: FitConfig, scale: float) -> tuple[float | None, float | None]:
    """ln of the factor bounds at scale ``scale``; refuses bounds that hold no factor."""
    lo, hi = bound_value(cfg.low, scale), bound_value(cfg.high, scale)
    if lo is not None and hi is not None and lo > hi:
        raise DPRoPEError(f"the factor bounds hold nothing: low {cfg.low!r} = {lo:.4g} > high {cfg.high!r} = "
                          f"{hi:.4g} at scale {scale:.4g}")
    return (None if lo is None else math.log(lo)), (None if hi is None else math.log(hi))


def satisfies(factors: Sequence[float], scale: float, cfg: FitConfig | None = None, tol: float = 1e-5) -> bool:
    """Whether ``factors`` keep the fit's constraints (LongRoPE's by default: non-decreasing, within [1, 1 + s])."""
    cfg = cfg or FitConfig()
    f = [float(v) for v in factors]
    lo, hi = bound_value(cfg.low, scale), bound_value(cfg.high, scale)
    if not f or not all(math.isfinite(v) and v > 0 for v in f):
        return False
    if lo is not None and min(f) < lo * (1 - tol):
        return False
    if hi is not None and max(f) > hi * (1 + tol):
        return False
    return not cfg.monotone or all(b >= a * (1 - tol) for a, b in zip(f, f[1:]))


# ----------------------------------------------------------------------------------------------- the start
def start_point(ctx, cfg: FitConfig) -> tuple[list[float], float, str]:
    """(log-factors, temperature, init method) of the start: ``cfg.init``'s factors, projected onto the
    constraints, and its temperature unless ``cfg.temperature`` names one."""
    from .registry import get_method, run_method, temperature

    m = get_method(cfg.init)
    if not m.standalone:
        raise DPRoPEError(f"fit option init must be a method that runs without the model (not '{m.name}', which "
                          f"needs a callable); e.g. dprope, yarn, or factors with long=FILE given as a start")
    if m.name == "dprope-fit":
        raise DPRoPEError("init cannot be the fit itself")
    r = run_method(m.name, ctx)
    lo, hi = log_bounds(cfg, ctx.scale)
    x = project([math.log(float(v)) for v in r.factors.tolist()], lo, hi, cfg.monotone)
    t = float(r.temperature) if cfg.temperature in (None, "init") else temperature(cfg.temperature, ctx.scale,
                                                                                  ctx.original_length)
    if cfg.fit_temperature:
        t = min(max(t, cfg.temperature_range[0]), cfg.temperature_range[1])
    return x, t, m.name


# ----------------------------------------------------------------------------------------------- the fit
def average_start(cfg: FitConfig, steps: int) -> int:
    """The first step ``pick`` = "average" averages: ``average_from`` x budget_steps for a fraction < 1, else the
    step number; never past the last step made."""
    af = float(cfg.average_from)
    start = int(af * int(cfg.budget_steps or steps)) if af < 1 else int(af)
    return max(0, min(start, int(steps) - 1))


def averaged(st: dict[str, Any], cfg: FitConfig) -> dict[str, Any]:
    """{"x", "y", "loss", "step"}: the mean of the evaluated points from :func:`average_start` on (log-factors and
    log-temperature), the mean loss of those steps (each on its own text: an estimate, not the average point's own
    loss), and the first step averaged."""
    pts = st.get("points") or []
    start = average_start(cfg, len(pts))
    tail = pts[start:]
    n = len(tail)
    x = [sum(p[0][i] for p in tail) / n for i in range(len(tail[0][0]))]
    y = sum(p[1] for p in tail) / n
    loss = sum(e["loss"] for e in st["trace"][start:]) / n
    return {"x": x, "y": y, "loss": loss, "step": start}


def _ctx_dict(ctx) -> dict[str, Any]:
    return {"n_pairs": ctx.n_pairs, "original_length": ctx.original_length, "target_length": ctx.target_length,
            "rope_theta": ctx.rope_theta, "inv_freq": [float(x) for x in ctx.inv_freq.tolist()]}


def _finite(xs) -> bool:
    return all(math.isfinite(float(v)) for v in xs)


def _resumed(state_path, kind: str, what: str, cfg: FitConfig, ctx) -> dict[str, Any] | None:
    """The saved state of this fit at ``state_path`` (None: none there), refused, naming the fix, when it is of
    another version or ``kind`` or belongs to another fit (its model, lengths or settings)."""
    from .search import load_state

    st = load_state(state_path) if state_path is not None else None
    if st is None:
        return None
    if st.get("version") != STATE_VERSION or st.get("kind") != kind:
        raise DPRoPEError(f"fit state {state_path} is not {what} of this version; delete it to start afresh")
    if st["config"] != cfg.fit_fields() or st["ctx"] != _ctx_dict(ctx):
        raise DPRoPEError(f"fit state {state_path} belongs to another fit (its model, lengths or settings "
                          "differ); use another state path or delete it")
    return st


def _budget_spent(cfg: FitConfig, done: int, seconds: float) -> str:
    """Which budget ``done`` evaluations in ``seconds`` have spent: "budget_steps", "budget_seconds" or ""."""
    if cfg.budget_steps is not None and done >= cfg.budget_steps:
        return "budget_steps"
    if cfg.budget_seconds is not None and seconds >= cfg.budget_seconds:
        return "budget_seconds"
    return ""


def fit(ctx, loss_and_grad: LossAndGrad, config: FitConfig | None = None, state_path=None,
        progress: Callable[[dict[str, Any]], None] | None = None, write_state: bool = True) -> FitResult:
    """Fit per-pair factors for ``ctx`` (a :class:`~dprope.freqs.RopeContext`) by projected Adam on their logs.

    loss_and_grad: see the module docstring.  progress(entry) is called with each trace entry.  state_path: the
    state file to resume from and write (``write_state`` False: read it, never write it, as the ranks of a
    distributed fit other than the first do).  An exception from ``loss_and_grad`` (Ctrl-C included) saves the
    state of the last finished step and propagates; call again with the same ``state_path`` to continue.
    """
    import torch

    from .search import StateSaver

    cfg = config or FitConfig()
    if cfg.space == "yarn":
        return fit_yarn_scan(ctx, loss_and_grad, cfg, state_path, progress, write_state)
    if cfg.budget_steps is None and cfg.budget_seconds is None:
        raise DPRoPEError("dprope-fit needs a budget: budget_steps (loss-and-gradient evaluations) and/or "
                          "budget_seconds")
    if not callable(loss_and_grad):
        raise DPRoPEError(f"loss_and_grad must be callable(log_factors, temperature, step) -> (loss, grad, "
                          f"grad_temperature), got {type(loss_and_grad).__name__}")
    lo, hi = log_bounds(cfg, ctx.scale)
    fixed = guarded_pairs(ctx, cfg.guard)
    if fixed >= ctx.n_pairs and not cfg.fit_temperature:
        raise DPRoPEError(f"every pair turns at least guard={cfg.guard} times inside the original window, so nothing "
                          "is left to fit: lower guard (or set it to none)")
    t_lo, t_hi = (math.log(cfg.temperature_range[0]), math.log(cfg.temperature_range[1]))
    st = _resumed(state_path, "fit", "a fit state", cfg, ctx)
    if st is not None:
        log.info("resuming the fit from %s: %d steps done, best loss %.6g", state_path, st["step"],
                 st["best"]["loss"] if st["best"] else math.nan)
    else:
        x0, t0, init = start_point(ctx, cfg)
        n = len(x0)
        st = {"version": STATE_VERSION, "kind": "fit", "config": cfg.fit_fields(), "ctx": _ctx_dict(ctx),
              "init": {"method": init, "log_factors": x0, "temperature": t0}, "x": x0, "y": math.log(t0),
              "m": [0.0] * (n + 1), "v": [0.0] * (n + 1), "step": 0, "best": None, "trace": [], "elapsed": 0.0}
    saver = StateSaver(state_path, st, write_state)
    b1, b2 = cfg.betas

    stopped = ""
    since_save = 0
    with saver:
        while True:
            stopped = _budget_spent(cfg, st["step"], saver.elapsed())
            if stopped:
                break
            k = int(st["step"])
            x, y = list(st["x"]), float(st["y"])
            t = math.exp(y) if cfg.fit_temperature else float(st["init"]["temperature"])
            loss, gx, gt = loss_and_grad(torch.tensor(x, dtype=torch.float64), t, k)
            loss = float(loss)
            gx = [float(g) for g in torch.as_tensor(gx, dtype=torch.float64).flatten().tolist()]
            if len(gx) != len(x):
                raise DPRoPEError(f"loss_and_grad returned {len(gx)} gradient values for {len(x)} log-factors")
            if not math.isfinite(loss) or not _finite(gx):
                raise DPRoPEError(f"the loss or its gradient is not finite at step {k} (loss {loss}): lower lr, or "
                                  "check the text and the model's dtype")
            gy = 0.0
            if cfg.fit_temperature:
                if gt is None or not math.isfinite(float(gt)):
                    raise DPRoPEError(f"fit_temperature needs the temperature's gradient; loss_and_grad gave {gt!r}")
                gy = float(gt) * t  # d loss / d ln t
            # Adam (Kingma & Ba 2015, Algorithm 1) on (x, y), then the projection onto the constraints
            g = [0.0] * fixed + gx[fixed:] + [gy]  # the guarded pairs keep the init's factor
            m = [b1 * mi + (1 - b1) * gi for mi, gi in zip(st["m"], g)]
            v = [b2 * vi + (1 - b2) * gi * gi for vi, gi in zip(st["v"], g)]
            c1, c2 = 1 - b1 ** (k + 1), 1 - b2 ** (k + 1)
            upd = [cfg.lr * (mi / c1) / (math.sqrt(vi / c2) + cfg.eps) for mi, vi in zip(m, v)]
            new_x = project([xi - ui for xi, ui in zip(x, upd[:-1])], lo, hi, cfg.monotone, fixed)
            new_y = min(max(y - upd[-1], t_lo), t_hi) if cfg.fit_temperature else y
            best = st["best"]
            if best is None or loss < best["loss"]:
                best = {"loss": loss, "x": x, "y": y, "step": k}
            entry = {"step": k, "loss": loss, "best": best["loss"], "temperature": t,
                     "grad_norm": math.sqrt(sum(gi * gi for gi in g))}
            # the step is done: the state moves to it in one go (an exception before here leaves the last one)
            st.update(x=new_x, y=new_y, m=m, v=v, step=k + 1, best=best)
            st["trace"].append(entry)
            st.setdefault("points", []).append([x, y])  # the evaluated point, for pick=average
            if k == 0:
                st["init"]["loss"] = loss
            log.info("fit step %d: loss %.6g (best %.6g), |grad| %.3g", k, loss, best["loss"], entry["grad_norm"])
            since_save += 1
            if since_save >= cfg.save_every:
                saver.save()
                since_save = 0
            if progress is not None:
                progress(dict(entry))
    best = st["best"]
    if best is None:
        raise DPRoPEError("the fit stopped before its first step (budget too small)")
    pick = cfg.pick if cfg.pick != "auto" else \
        ("average" if getattr(loss_and_grad, "stochastic", False) else "best")
    if pick == "average":
        best = averaged(st, cfg)
        log.info("fit stopped (%s) after %d steps; the average of steps %d.. (mean loss there %.6g; start %.6g)",
                 stopped, st["step"], best["step"], best["loss"], st["init"].get("loss", math.nan))
    else:
        log.info("fit stopped (%s) after %d steps; best loss %.6g at step %d (start %.6g)", stopped, st["step"],
                 best["loss"], best["step"], st["init"].get("loss", math.nan))
    factors = torch.tensor([math.exp(v) for v in best["x"]], dtype=torch.float64).float()
    temp = math.exp(best["y"]) if cfg.fit_temperature else float(st["init"]["temperature"])
    return FitResult(factors=factors, temperature=temp, loss=float(best["loss"]),
                     trace=[dict(e) for e in st["trace"]], steps=int(st["step"]), stopped=stopped,
                     config=cfg.to_dict(), best_step=int(best["step"]),
                     init={"method": st["init"]["method"], "loss": st["init"].get("loss")},
                     elapsed=float(st["elapsed"]), fixed_pairs=fixed, pick=pick)


# ----------------------------------------------------------------------------------------------- the YaRN space
def scan_value(loss_and_grad, log_factors, temperature: float, steps: int) -> float:
    """The loss of one factor set on the text of steps 0 .. ``steps`` - 1, forward only where the loss offers it
    (a ``value(log_factors, temperature, steps)`` method, convert/evaluate/fit.py's), else the mean of its
    ``loss_and_grad`` losses over those steps."""
    import torch

    lf = torch.tensor([float(v) for v in log_factors], dtype=torch.float64)
    value = getattr(loss_and_grad, "value", None)
    if callable(value):
        return float(value(lf, float(temperature), int(steps)))
    return sum(float(loss_and_grad(lf, float(temperature), k)[0]) for k in range(int(steps))) / int(steps)


def fit_yarn_scan(ctx, loss_and_grad: LossAndGrad, cfg: FitConfig, state_path=None,
                  progress: Callable[[dict[str, Any]], None] | None = None, write_state: bool = True) -> FitResult:
    """YaRN fitted by the loss (``space`` = "yarn"), for runtimes whose graph runs only YaRN from the file's keys
    (llama.cpp's qwen2, qwen3 and gemma3 graphs; :mod:`dprope.yarn_fit`): the one free number is L_o (the file's
    original_context_length), with f = target / L_o as transformers and llama.cpp read the pair.  Each candidate's
    YaRN factors are scored by the same loss on the same text (steps 0 .. ``scan_steps`` - 1 of the loss: the same
    windows and position ids for every candidate, so the comparison is paired and the result deterministic), each at
    the temperature the runtime applies with it, YaRN's 1 + 0.1 ln f (``scan_temperature`` = "yarn", the default:
    llama.cpp computes it from the file's factor and applies it to the scaled layers, so that is what the output
    runs; "fixed" reads every candidate at the init's, ranking the frequencies alone, which a first Gemma 3
    measurement showed misleads: its pick, f = 12, ran at llama.cpp's 1.25 and lost 11% to f = 2); first ``scan_points`` values of L_o spaced
    geometrically over 0.25 .. 1.25 x the original window (llama.cpp's own YaRN at this target, L_o = the original
    window, always among them), then the geometric midpoints around the best until they are within 2% of it or the
    budget (``budget_steps``: candidate evaluations) is spent.  The result carries the best candidate's factors and
    YaRN's own temperature for its f, 1 + 0.1 ln f (what llama.cpp applies to the scaled layers).  Resumable: every
    candidate's loss is saved as it comes."""
    import torch

    from .registry import temperature
    from .search import StateSaver
    from .yarn_fit import refine_lengths, scan_lengths, yarn_factors

    if cfg.fit_temperature:
        raise DPRoPEError("space=yarn keeps the temperature fixed (YaRN's own 1 + 0.1 ln f at the end): drop "
                          "fit_temperature")
    if cfg.budget_steps is not None and cfg.budget_steps < 2:
        raise DPRoPEError(f"space=yarn needs budget_steps >= 2 candidate evaluations, got {cfg.budget_steps}")
    if ctx.rope_theta is None:
        raise DPRoPEError("space=yarn needs the model's rope_theta (YaRN's ramp is computed from it)")
    head_dim, theta = 2 * ctx.n_pairs, float(ctx.rope_theta)
    T, L = int(ctx.target_length), int(ctx.original_length)
    st = _resumed(state_path, "yarn-scan", "a YaRN scan", cfg, ctx)
    if st is not None:
        log.info("resuming the YaRN scan from %s: %d candidates done", state_path, len(st["trace"]))
    else:
        _, t0, init = start_point(ctx, cfg)
        st = {"version": STATE_VERSION, "kind": "yarn-scan", "config": cfg.fit_fields(), "ctx": _ctx_dict(ctx),
              "init": {"method": init, "temperature": t0}, "trace": [], "elapsed": 0.0}
    saver = StateSaver(state_path, st, write_state)
    t = float(st["init"]["temperature"])

    def seen() -> dict[int, float]:
        return {int(e["original_length"]): float(e["loss"]) for e in st["trace"]}

    queue = [Lo for Lo in scan_lengths(head_dim, theta, L, T, cfg.scan_points) if Lo not in seen()]
    stopped = "converged"
    with saver:
        while True:
            if not queue:
                queue = refine_lengths(seen(), head_dim, theta, T)
                if not queue:
                    break
            spent = _budget_spent(cfg, len(st["trace"]), saver.elapsed())
            if spent:
                stopped = spent
                break
            Lo = queue.pop(0)
            f = T / Lo
            lf = [math.log(float(v)) for v in yarn_factors(head_dim, theta, f, Lo)]
            tc = temperature("yarn", f, Lo) if cfg.scan_temperature == "yarn" else t
            loss = scan_value(loss_and_grad, lf, tc, cfg.scan_steps)
            if not math.isfinite(loss):
                raise DPRoPEError(f"the loss is not finite for YaRN factor {f:.4g}, original_context_length {Lo}")
            best = min([loss] + [float(e["loss"]) for e in st["trace"]])
            entry = {"step": len(st["trace"]), "loss": loss, "best": best, "temperature": tc, "original_length": Lo,
                     "factor": f}
            st["trace"].append(entry)
            log.info("YaRN scan: original_context_length %d, factor %.4g: loss %.6g (best %.6g)", Lo, f, loss, best)
            saver.save()
            if progress is not None:
                progress(dict(entry))
    if not st["trace"]:
        raise DPRoPEError("the YaRN scan stopped before its first candidate (budget too small)")
    done = seen()
    Lo = min(done, key=lambda k: (done[k], k))
    f = T / Lo
    factors = torch.tensor(yarn_factors(head_dim, theta, f, Lo), dtype=torch.float64).float()
    own = done.get(min(done, key=lambda k: abs(k - L)))  # the candidate at (or nearest) llama.cpp's own YaRN
    k = next(e["step"] for e in st["trace"] if int(e["original_length"]) == Lo)
    return FitResult(factors=factors, temperature=temperature("yarn", f, Lo), loss=done[Lo],
                     trace=[dict(e) for e in st["trace"]], steps=len(st["trace"]), stopped=stopped,
                     config=cfg.to_dict(), best_step=int(k),
                     init={"method": "yarn", "loss": own,
                           "scan_temperature": "yarn" if cfg.scan_temperature == "yarn" else t,
                           "from": st["init"]["method"]},
                     elapsed=float(st["elapsed"]), fixed_pairs=0, pick="best")
