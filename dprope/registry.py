"""The registry of extension methods: a name and options to ``fn(ctx, **options) -> DPRoPEResult``, and the
attention temperatures methods pair their factors with.

The methods themselves register in :mod:`dprope.methods` (imported by ``dprope`` itself, so the registry is full
whenever it is read); :mod:`dprope.search` reads the registry for its initial individuals, which is why the
registry sits below both.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

from .errors import DPRoPEError

log = logging.getLogger("dprope.methods")

DEFAULT_METHOD = "dprope"


@dataclass(frozen=True)
class Method:
    name: str
    fn: Callable[..., Any]  # fn(ctx: RopeContext, **options) -> DPRoPEResult
    summary: str
    family: str
    defaults: Mapping[str, Any] = field(default_factory=dict)

    @property
    def standalone(self) -> bool:
        """Runs from a RopeContext and its defaults alone (a search needs a fitness callable from the pipeline;
        ``factors`` needs the factors)."""
        return self.family not in ("search", "given")

    def options(self, given: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """The method's defaults updated with ``given``; unknown names are refused, naming the known ones."""
        given = dict(given or {})
        unknown = sorted(set(given) - set(self.defaults))
        if unknown:
            known = ", ".join(sorted(self.defaults)) or "none"
            raise DPRoPEError(f"method '{self.name}' has no option(s) {', '.join(unknown)}; its options: {known}")
        return {**self.defaults, **given}


_METHODS: dict[str, Method] = {}


def register_method(name: str, summary: str, family: str = "user", **defaults):
    """Decorator: register ``fn(ctx, **options) -> DPRoPEResult`` under ``name`` with its option defaults."""

    def deco(fn):
        key = name.lower()
        if key in _METHODS:
            raise DPRoPEError(f"method '{name}' is already registered")
        _METHODS[key] = Method(key, fn, summary, family, dict(defaults))
        return fn

    return deco


def unregister_method(name: str) -> None:
    _METHODS.pop(name.lower(), None)


def get_method(name: str) -> Method:
    try:
        return _METHODS[name.lower()]
    except KeyError:
        raise DPRoPEError(f"unknown method '{name}'; registered: {', '.join(available_methods())} "
                          "(`dprope methods` describes each)") from None


def available_methods(standalone: bool = False) -> list[str]:
    """Registered method names; ``standalone``: only those that run without a pipeline-supplied callable."""
    return [n for n, m in _METHODS.items() if not standalone or m.standalone]


def run_method(name: str, ctx, **options):
    """Factors, temperature and report of method ``name`` for ``ctx`` (a :class:`~dprope.freqs.RopeContext`)."""
    m = get_method(name)
    opts = m.options(options)
    result = m.fn(ctx, **opts)
    result.method = m.name
    result.params["method"] = m.name
    result.params["options"] = {k: (f"<callable {getattr(v, '__qualname__', type(v).__name__)}>"
                                    if callable(v) else v) for k, v in opts.items()}
    result.params["temperature"] = result.temperature
    log.info("method %s: temperature %.4f, factors %s..%s", m.name, result.temperature,
             f"{float(result.factors.min()):.3g}", f"{float(result.factors.max()):.3g}")
    return result


# ----------------------------------------------------------------------------------------------- temperature
TEMPERATURES = ("none", "yarn", "longrope")


def temperature(spec: Any, scale: float, original_length: int) -> float:
    """cos/sin multiplier for a temperature spec: 'none' (1), 'yarn' (0.1 ln s + 1, Peng et al. 2023),
    'longrope' (sqrt(1 + ln s / ln L), Ding et al. 2024, the default of transformers' longrope), or a number."""
    if spec is None or spec == "none":
        return 1.0
    if spec == "yarn":
        return 0.1 * math.log(scale) + 1.0
    if spec == "longrope":
        return math.sqrt(1 + math.log(scale) / math.log(original_length))
    try:
        t = float(spec)
    except (TypeError, ValueError):
        raise DPRoPEError(f"temperature must be one of {', '.join(TEMPERATURES)} or a number, got {spec!r}") from None
    if not (math.isfinite(t) and t > 0):
        raise DPRoPEError(f"temperature must be a finite number > 0, got {spec!r}")
    return t
