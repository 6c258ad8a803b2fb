"""Human-readable views of a DPRoPE result: a table and the Figure-1 style plot."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import numpy as np

import dprope
from dprope import DPRoPEResult

from convert.names import TRACE_JSON, TRACE_PNG

log = logging.getLogger(__name__)


def _ranges(idx: list[int]) -> str:
    """[1,2,3,7] -> '1-3, 7'"""
    out, start = [], None
    for i, v in enumerate(idx):
        if start is None:
            start = v
        if i + 1 == len(idx) or idx[i + 1] != v + 1:
            out.append(f"{start}" if start == v else f"{start}-{v}")
            start = None
    return ", ".join(out) or "none"


def summary_lines(r: DPRoPEResult) -> list[str]:
    p = r.params
    lines = [
        f"DPRoPE {p['original_length']} -> {p['target_length']} (scale {p['scale']:.4g}), head_dim {p['head_dim']}, "
        f"{p['bins']} bins, selection {p['selection']}",
    ]
    for c in r.candidates:
        pairs = r.pairs_for(c)
        lines.append(f"  {c}: {len(pairs)} pairs [{_ranges(pairs)}]")
    dist = ", ".join(f"{k} {v:.6g}" for k, v in r.disturbance.items())
    lines.append(f"  total disturbance (mean KL over pairs, nats): {dist}")
    return lines


def render_table(r: DPRoPEResult, console=None) -> None:
    """Per-pair table plus summary, printed with rich."""
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    t = Table(title="DPRoPE factors per rotary pair", show_lines=False)
    t.add_column("pair", justify="right")
    t.add_column("wavelength", justify="right")
    for c in r.candidates:
        t.add_column(f"D[{c}]", justify="right")
    t.add_column("chosen")
    t.add_column("factor", justify="right")
    wl = (np.float32(2 * math.pi) / np.asarray(r.base_inv_freq, dtype=np.float32)).tolist()
    for i in range(len(r.chosen)):
        t.add_row(str(i), f"{wl[i]:.1f}", *[f"{float(r.per_pair[c][i]):.5f}" for c in r.candidates],
                  r.chosen[i], f"{float(r.factors[i]):.4g}")
    console.print(t)
    for line in summary_lines(r):
        console.print(line)


def plot_result(r: DPRoPEResult, path: Path, pairs: tuple[int, int] | None = None) -> Path:
    """Per-pair disturbance of each candidate and the choice (top); angle histograms of two pairs, pre-trained
    vs candidates (bottom), like the paper's Figure 1."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    p = r.params
    n = len(r.chosen)
    if pairs is None:
        # one pair where the choice matters most each way (largest disturbance gap)
        first = r.candidates[0]
        others = [c for c in r.candidates[1:]] or [first]
        best_other = np.stack([np.asarray(r.per_pair[c]) for c in others]).min(0)
        gap = r.per_pair[first] - best_other
        pairs = (int(gap.argmin()), int(gap.argmax()))
    fig = plt.figure(figsize=(11, 7.5))
    ax = fig.add_subplot(2, 1, 1)
    x = list(range(n))
    for c in r.candidates:
        ax.plot(x, np.maximum(np.asarray(r.per_pair[c]), 1e-12).tolist(), marker=".",
                label=f"{c} (mean {r.disturbance[c]:.4g})")
    sel = np.maximum(np.array([float(r.per_pair[c][i]) for i, c in enumerate(r.chosen)]), 1e-12)
    ax.plot(x, sel.tolist(), "k--", lw=1, label=f"chosen (mean {r.disturbance['selected']:.4g})")
    ax.set_yscale("log")
    ax.set_xlabel("rotary pair i")
    ax.set_ylabel("KL(P_L || P_L') [nats]")
    ax.set_title(f"DPRoPE {p['original_length']} -> {p['target_length']}: disturbance per pair")
    ax.legend(fontsize=8)
    bins = p["bins"]
    centres = [(k + 0.5) * 360.0 / bins for k in range(bins)]
    for j, pair in enumerate(pairs):
        ax = fig.add_subplot(2, 2, 3 + j)
        base = r.base_inv_freq[pair : pair + 1]
        h0 = dprope.angle_distribution(dprope.angle_histogram(base, p["original_length"], bins), p["original_length"])
        ax.plot(centres, h0[0].tolist(), "k", lw=1.5, label=f"pre-trained (L={p['original_length']})")
        for c in r.candidates:
            f = base / r.candidate_factors[c][pair : pair + 1]
            h = dprope.angle_distribution(dprope.angle_histogram(f, p["target_length"], bins), p["target_length"])
            ax.plot(centres, h[0].tolist(), lw=1, alpha=0.8, label=f"{c} (D={float(r.per_pair[c][pair]):.3g})")
        ax.set_title(f"pair {pair}: chosen {r.chosen[pair]}")
        ax.set_xlabel("rotary angle [deg]")
        ax.set_ylabel("probability")
        ax.legend(fontsize=7)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    log.info("wrote %s", path)
    return path


# ------------------------------------------------------------------------------------------- search trace
def write_trace(out: Path, result: DPRoPEResult, plot: bool = True) -> list[Path]:
    """search_trace.json (best and median fitness per iteration, and how the search ran; for a gradient fit, the
    loss per step) and search_trace.png in ``out``, for a result that carries a search (``params["search"]``);
    nothing otherwise."""
    s = result.params.get("search")
    if not s:
        return []
    out = Path(out)
    data = {"method": result.method, "fitness": s.get("fitness_spec"), "best_fitness": s.get("fitness"),
            "evals": s.get("evals"), "stopped": s.get("stopped"), "seconds_per_eval": s.get("seconds_per_eval"),
            "temperature": result.temperature, "critical_pair": s.get("critical_pair"),
            "config": s.get("config"), "trace": s.get("trace", []),
            **{k: s[k] for k in ("kind", "best_step", "init", "tokens_per_step", "processes", "device") if k in s}}
    (out / TRACE_JSON).write_text(json.dumps(data, indent=1, default=str) + "\n")
    made = [out / TRACE_JSON]
    if plot:
        plot_trace(data, out / TRACE_PNG)
        made.append(out / TRACE_PNG)
    return made


def plot_trace(data: dict, path: Path) -> None:
    """Best and median fitness per iteration (log scale); for a gradient fit, the loss per step and the best so
    far."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    trace = data.get("trace") or []
    fitted = bool(trace) and "loss" in trace[0]  # a gradient fit (dprope-fit): the loss per step
    scan = fitted and "original_length" in trace[0]  # dprope-fit space=yarn: the loss per YaRN candidate
    fig, ax = plt.subplots(figsize=(7, 4))
    finite = lambda xs: [x if x is not None and math.isfinite(x) else float("nan") for x in xs]  # noqa: E731
    if scan:
        pts = sorted((e["original_length"], e["loss"]) for e in trace)
        ax.plot([p[0] for p in pts], finite([p[1] for p in pts]), "o-", label="loss of the candidate")
        b = min(trace, key=lambda e: e["loss"])
        ax.plot([b["original_length"]], [b["loss"]], "r*", ms=12, label=f"best: factor {b['factor']:.3g}")
        ax.set_xscale("log")
        ax.legend()
        ax.set_xlabel("YaRN original_context_length L_o (factor = target / L_o)")
        unit = "candidates"
    elif fitted:
        steps = [e["step"] for e in trace]
        ax.plot(steps, finite([e["loss"] for e in trace]), ".-", label="loss at the step")
        ax.plot(steps, finite([e["best"] for e in trace]), "k--", lw=1, label="best so far")
        ax.legend()
        ax.set_xlabel("step (Adam on the log-factors; 0: the start)")
        unit = "steps"
    else:
        if trace:
            it = [e["iteration"] for e in trace]
            ax.plot(it, finite([e["best"] for e in trace]), "o-", label="best")
            ax.plot(it, finite([e["median"] for e in trace]), "s--", label="median")
            ax.set_yscale("log")
            ax.legend()
        else:
            ax.text(0.5, 0.5, "stopped before the first iteration finished", ha="center", va="center",
                    transform=ax.transAxes)
        ax.set_xlabel("iteration (0: the initial population)")
        unit = "evaluations"
    if not scan:
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    if fitted:
        ax.set_ylabel(f"loss, nats per token ({data.get('fitness') or 'lower is better'})", fontsize=8)
    else:
        ax.set_ylabel(f"fitness ({data.get('fitness') or 'lower is better'})")
    ax.set_title(f"{data.get('method')}{' (YaRN)' if scan else ''}: best {data.get('best_fitness'):.4g} after "
                 f"{data.get('evals')} {unit} ({data.get('stopped')})", fontsize=9)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
