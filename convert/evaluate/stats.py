"""Sample counts and 95% intervals for the validation table: the one place that turns per-sample scores into
``{value, n, lo, hi, method, unit}`` (numpy only).

- Accuracy (0/1 per prompt): the Wilson score interval (E. B. Wilson, "Probable inference, the law of succession,
  and statistical inference", JASA 22, 1927), which keeps its coverage near 95% at small n and at 0 or n correct,
  where the normal (Wald) interval collapses to a point; lm-eval reports the Wald standard error of a mean
  (lm_eval/api/metrics.py ``mean_stderr``).  Scores that are not all 0 or 1 (RULER's partial matches) get a
  percentile bootstrap of the mean instead.
- Perplexity: exp(sum of negative log-likelihoods / sum of tokens) over the units scored, with a percentile bootstrap
  over those units (B. Efron and R. Tibshirani, "An Introduction to the Bootstrap", 1993, ch. 13; lm-eval bootstraps
  its corpus-level metrics too: ``bootstrap_stderr``, ``bootstrap_iters``).  The units are documents when there are
  several; inside a single window they are non-overlapping blocks of consecutive positions (the block bootstrap of
  E. Carlstein, Annals of Statistics 14, 1986 / H. Kuensch, Annals of Statistics 17, 1989), so that the dependence
  between neighbouring tokens stays inside a unit.  The result says which (``unit``).
- Base vs extended on the same samples: a paired percentile bootstrap that resamples the same units (prompts,
  documents or blocks) for both models: the difference of accuracies, the ratio extended / base of perplexities.
  When both models score every unit alike the interval is exactly [0, 0] (ratio [1, 1]), which an unpaired
  interval, or Newcombe's closed form for paired proportions (Statistics in Medicine 17, 1998), does not give.

Every bootstrap is seeded (``SEED``) and uses ``RESAMPLES`` resamples, so a report is reproducible to the digit.
With very few units (n < 5 or so) a bootstrap interval is too narrow; n is shown beside every interval.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import numpy as np

Z95 = 1.959963984540054  # the 0.975 quantile of the standard normal
RESAMPLES = 2000
SEED = 0
MAX_BLOCK = 1024  # tokens per resampled block inside one window, at most
MIN_BLOCKS = 16  # blocks per window aimed for (a shorter block where the window is short)


def _stat(value, n, lo, hi, method: str, unit: str) -> dict:
    f = lambda x: None if x is None or not math.isfinite(x) else float(x)  # noqa: E731
    return {"value": f(value), "n": int(n), "lo": f(lo), "hi": f(hi), "method": method, "unit": unit}


def wilson(k: float, n: int, z: float = Z95) -> tuple[float, float]:
    """The Wilson score interval of k successes in n trials (0 <= k <= n, n >= 1)."""
    if n <= 0:
        raise ValueError("the Wilson interval needs at least one trial")
    p = k / n
    z2 = z * z
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = z / (1 + z2 / n) * math.sqrt(max(0.0, p * (1 - p) / n + z2 / (4 * n * n)))
    # at 0 or n successes the bound is exactly 0 or 1 (centre and half-width agree there; rounding would not say so)
    return (0.0 if k <= 0 else max(0.0, centre - half)), (1.0 if k >= n else min(1.0, centre + half))


def _resample_idx(m: int, resamples: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, m, size=(resamples, m))


def _percentile(stats: np.ndarray) -> tuple[float, float]:
    stats = stats[np.isfinite(stats)]
    if not len(stats):
        return float("nan"), float("nan")
    lo, hi = np.quantile(stats, [0.025, 0.975])
    return float(lo), float(hi)


def _boot(how: str, resamples: int) -> str:
    return f"percentile bootstrap, {resamples} resamples" if how == "single" else \
        f"paired percentile bootstrap, {resamples} resamples"


def accuracy(scores: Sequence[float], unit: str = "prompts", resamples: int = RESAMPLES, seed: int = SEED) -> dict:
    """Mean of per-prompt scores in [0, 1] with its 95% interval: Wilson's for 0/1 scores, else a percentile
    bootstrap of the mean."""
    x = np.asarray(scores, dtype=np.float64)
    n = len(x)
    if n == 0:
        return _stat(None, 0, None, None, "none", unit)
    mean = float(x.mean())
    if np.all((x == 0) | (x == 1)):
        lo, hi = wilson(float(x.sum()), n)
        return _stat(mean, n, lo, hi, "Wilson score", unit)
    if n < 2:
        return _stat(mean, n, None, None, "none (one sample)", unit)
    lo, hi = _percentile(x[_resample_idx(n, resamples, seed)].mean(axis=1))
    return _stat(mean, n, lo, hi, _boot("single", resamples), unit)


def mean_of_means(groups: Sequence[Sequence[float]], unit: str = "prompts", resamples: int = RESAMPLES,
                  seed: int = SEED) -> dict:
    """The average of several tasks' mean scores (RULER's average row), with a stratified percentile bootstrap:
    each task's prompts are resampled within that task."""
    gs = [np.asarray(g, dtype=np.float64) for g in groups if len(g)]
    if not gs:
        return _stat(None, 0, None, None, "none", unit)
    value = float(np.mean([g.mean() for g in gs]))
    n = sum(len(g) for g in gs)
    if any(len(g) < 2 for g in gs):
        return _stat(value, n, None, None, "none (a task with one sample)", unit)
    rng = np.random.default_rng(seed)
    boot = np.mean([g[rng.integers(0, len(g), size=(resamples, len(g)))].mean(axis=1) for g in gs], axis=0)
    lo, hi = _percentile(boot)
    return _stat(value, n, lo, hi, f"stratified percentile bootstrap, {resamples} resamples", unit)


def perplexity(nll: Sequence[float], tokens: Sequence[int], unit: str = "documents", resamples: int = RESAMPLES,
               seed: int = SEED) -> dict:
    """exp(sum nll / sum tokens) over units (each a sum of negative log-likelihoods and its token count), with a
    percentile bootstrap over the units."""
    a = np.asarray(nll, dtype=np.float64)
    t = np.asarray(tokens, dtype=np.float64)
    n = len(a)
    if n == 0 or t.sum() <= 0:
        return _stat(None, n, None, None, "none", unit)
    value = math.exp(a.sum() / t.sum())
    if n < 2:
        return _stat(value, n, None, None, "none (one unit)", unit)
    idx = _resample_idx(n, resamples, seed)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        lo, hi = _percentile(np.exp(a[idx].sum(1) / t[idx].sum(1)))
    return _stat(value, n, lo, hi, _boot("single", resamples), unit)


def paired(stat: Callable[[np.ndarray], np.ndarray], n: int, method: str, unit: str, resamples: int = RESAMPLES,
           seed: int = SEED) -> dict:
    """A paired statistic with its percentile bootstrap: ``stat(idx)`` maps index arrays [r, n] (rows: resamples of
    the units, the same for both models) to [r] values; its value is ``stat`` of the identity resample."""
    if n == 0:
        return _stat(None, 0, None, None, "none", unit)
    value = float(stat(np.arange(n)[None])[0])
    if n < 2:
        return _stat(value, n, None, None, "none (one unit)", unit)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        lo, hi = _percentile(stat(_resample_idx(n, resamples, seed)))
    return _stat(value, n, lo, hi, f"{method}, {_boot('paired', resamples)}", unit)


def paired_accuracy(base: Sequence[float], extended: Sequence[float], factor: float = 1.0, unit: str = "prompts",
                    **kw) -> dict | None:
    """mean(extended) - factor * mean(base) on the same prompts, paired bootstrap (:func:`paired_means` of one
    group); None when the samples do not pair up."""
    return paired_means([base], [extended], factor, unit, **kw)


def paired_perplexity_ratio(base_nll, base_tokens, ext_nll, ext_tokens, unit: str = "documents", **kw) -> dict | None:
    """perplexity(extended) / perplexity(base) over the same units; None when the units do not pair up."""
    bn, bt = np.asarray(base_nll, np.float64), np.asarray(base_tokens, np.float64)
    en, et = np.asarray(ext_nll, np.float64), np.asarray(ext_tokens, np.float64)
    if not (len(bn) == len(bt) == len(en) == len(et)) or len(bn) == 0:
        return None
    return paired(lambda idx: np.exp(en[idx].sum(1) / et[idx].sum(1) - bn[idx].sum(1) / bt[idx].sum(1)),
                  len(bn), "ratio", unit, **kw)


def block_units(block_ll: Sequence[float], block: int, start: int, stop: int, n_tokens: int
                ) -> tuple[list[float], list[int], int] | None:
    """The positions start..stop-1 of one window as bootstrap units: (nll per unit, tokens per unit, tokens per
    unit) from the window's per-``block`` log-likelihood sums (``block_ll``, the last block possibly short:
    ``n_tokens`` tokens in all).  Units are whole blocks merged to at most MAX_BLOCK tokens, as long as the span
    still gives MIN_BLOCKS of them; None when ``start`` is off the block grid."""
    stop = min(int(stop), int(n_tokens))
    if block <= 0 or start % block or stop <= start:
        return None
    first, last = start // block, -(-stop // block)
    if last > len(block_ll):
        return None
    if stop % block and stop != n_tokens:
        return None  # the span ends inside a block that goes on past it
    span = stop - start
    per = max(1, min(MAX_BLOCK // block, span // block // MIN_BLOCKS))
    nll, toks = [], []
    for j in range(first, last, per):
        hi = min(j + per, last)
        nll.append(-float(sum(block_ll[j:hi])))
        toks.append(min(hi * block, stop) - j * block)
    return nll, toks, per * block


def fmt_interval(s: dict | None, digits: int = 4) -> str:
    """'0.96 [0.90, 0.98]' (the interval omitted where there is none)."""
    if not s or s.get("value") is None:
        return "-"
    v = f"{s['value']:.{digits}g}"
    if s.get("lo") is None or s.get("hi") is None:
        return v
    return f"{v} [{s['lo']:.{digits}g}, {s['hi']:.{digits}g}]"


def paired_means(base_groups: Sequence[Sequence[float]], ext_groups: Sequence[Sequence[float]], factor: float = 1.0,
                 unit: str = "prompts", resamples: int = RESAMPLES, seed: int = SEED) -> dict | None:
    """The average over groups (tasks) of mean(extended) - factor * mean(base), on the same prompts, each group's
    prompts resampled within it, the same resample for both models (one group: a paired accuracy difference; a gate
    'acc >= v x base' holds when this with factor v is >= 0).  None when the samples do not pair up."""
    bs = [np.asarray(g, dtype=np.float64) for g in base_groups]
    es = [np.asarray(g, dtype=np.float64) for g in ext_groups]
    if len(bs) != len(es) or not bs or any(len(b) != len(e) or not len(b) for b, e in zip(bs, es)):
        return None
    name = "difference" if factor == 1.0 else f"extended - {factor:g} x base"
    n = sum(len(b) for b in bs)
    value = float(np.mean([e.mean() - factor * b.mean() for b, e in zip(bs, es)]))
    if any(len(b) < 2 for b in bs):
        return _stat(value, n, None, None, f"{name}, none (a group with one sample)", unit)
    rng = np.random.default_rng(seed)
    boot = np.zeros(resamples)
    for b, e in zip(bs, es):
        idx = rng.integers(0, len(b), size=(resamples, len(b)))
        boot += e[idx].mean(1) - factor * b[idx].mean(1)
    lo, hi = _percentile(boot / len(bs))
    how = "stratified " if len(bs) > 1 else ""
    return _stat(value, n, lo, hi, f"{name}, paired {how}percentile bootstrap, {resamples} resamples", unit)
