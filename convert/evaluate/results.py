"""Validation results: release gates ("ppl@8192-16384 <= 0.5x base"), the base-vs-extended table, its Markdown
and its plot."""


from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence


from convert.errors import ConvertError
from convert.evaluate.engine import PROJECT_TASKS

log = logging.getLogger(__name__)

# ------------------------------------------------------------------------------------------- gates and report
_GATE = re.compile(r"^\s*(passkey|ppl|ruler|[a-z_0-9]+)@(\d+)(?:-(\d+))?\s*(>=|<=|>|<)\s*([0-9.eE+-]+)\s*"
                   r"(x\s*base)?\s*$")


@dataclass
class Gate:
    text: str
    metric: str
    length: int
    upper: int | None
    op: str
    value: float
    relative: bool

    @classmethod
    def parse(cls, text: str) -> "Gate":
        m = _GATE.match(text)
        if not m:
            raise ConvertError(f"gate '{text}' is not understood; write e.g. 'passkey@16384 >= 0.9', "
                               "'ppl@0-8192 <= 1.05x base' or 'ruler@16384 >= 0.5'")
        metric, a, b, op, v, rel = m.groups()
        if metric == "ppl" and b is None:
            raise ConvertError(f"gate '{text}': ppl gates name a bucket, e.g. ppl@0-8192 or ppl@8192-16384")
        lo, hi = (int(a), int(b)) if b else (int(a), None)
        return cls(text, metric, lo, hi, op, float(v), bool(rel))


def ppl_buckets(rows: dict, lengths: Sequence[int], edges: Sequence[int] = ()) -> dict[tuple[int, int], float]:
    """Perplexity of the tokens between consecutive lengths, from the per-length sums of the same documents.  An
    ``edges`` value that is not a length (the base's window) also gives the two parts of the bucket it falls in
    (the whole bucket stays, so gates naming it still find it), from the per-position block sums (``block_ll``) of
    the run at the bucket's upper length: the tokens before the edge are the first ``edge`` of each of its
    documents, so a part is what a run at that length would give."""
    points = []  # (length, loglik sum, token count) of the tokens before each length
    for L in sorted(lengths):
        m = rows.get(L)
        if m is not None:
            points.append((L, m["loglik_sum"], m["token_count"]))
    split = []
    for e in sorted(set(int(x) for x in edges) - {p[0] for p in points}):
        above = next((p for p in points if p[0] > e), None)
        m = rows.get(above[0]) if above else None
        block, docs = (m or {}).get("block"), (m or {}).get("block_ll")
        if not docs or not block or e % block or any(len(d) <= e // block for d in docs):
            continue  # no block sums, the edge is not on a block boundary, or a document ends before it
        split.append((e, sum(sum(d[: e // block]) for d in docs), e * len(docs)))
    out = {}
    for pts in (points, sorted(points + split)):
        prev_ll, prev_n, prev_len = 0.0, 0, 0
        for L, ll, n in pts:
            if n > prev_n:
                out.setdefault((prev_len, L), math.exp(-(ll - prev_ll) / (n - prev_n)))
            prev_ll, prev_n, prev_len = ll, n, L
    return out


def table_rows(results: list[dict], lengths: Sequence[int], edges: Sequence[int] = ()) -> list[dict]:
    """rows: {name, length, base, extended}: passkey / RULER per length, ppl per bucket (between lengths, and split
    at ``edges``: :func:`ppl_buckets`), ruler average."""
    by = {}
    for r in results:
        by.setdefault((r["model"], r["task"]), {})[r["length"]] = r["metrics"]
    rows = []
    tasks = sorted({r["task"] for r in results}, key=lambda t: (t != "passkey", t != "ppl", t))
    for task in tasks:
        if task == "ppl":
            b = {m: ppl_buckets(by.get((m, "ppl"), {}), lengths, edges) for m in ("base", "extended")}
            for bucket in sorted(set(b["base"]) | set(b["extended"])):
                rows.append({"name": f"ppl {bucket[0]}-{bucket[1]}", "task": "ppl", "length": bucket,
                             "base": b["base"].get(bucket), "extended": b["extended"].get(bucket)})
            continue
        key = "acc" if task == "passkey" else "score"
        for L in sorted(lengths):
            vals = {m: (by.get((m, task), {}).get(L) or {}).get(key) for m in ("base", "extended")}
            rows.append({"name": f"{task} @{L}", "task": task, "length": L, **vals})
    ruler = [t for t in tasks if t not in PROJECT_TASKS]
    if ruler:
        for L in sorted(lengths):
            vals = {}
            for m in ("base", "extended"):
                xs = [(by.get((m, t), {}).get(L) or {}).get("score") for t in ruler]
                xs = [x for x in xs if x is not None]
                vals[m] = sum(xs) / len(xs) if xs else None
            rows.append({"name": f"ruler average @{L}", "task": "ruler", "length": L, **vals})
    return rows


def check_gates(rows: list[dict], gates: Sequence[Gate]) -> list[tuple[Gate, str]]:
    """(gate, reason) for every failed gate."""
    failed = []
    ops = {">=": lambda a, b: a >= b, "<=": lambda a, b: a <= b, ">": lambda a, b: a > b, "<": lambda a, b: a < b}
    for g in gates:
        want = (g.length, g.upper) if g.metric == "ppl" else g.length
        row = next((r for r in rows if r["task"] == g.metric and r["length"] == want), None)
        if row is None or row["extended"] is None:
            failed.append((g, "not measured in this run (add the task and length)"))
            continue
        ref = g.value
        if g.relative:
            if row["base"] is None:
                failed.append((g, "needs the base model (--base)"))
                continue
            ref = g.value * row["base"]
        if not ops[g.op](row["extended"], ref):
            failed.append((g, f"extended {row['extended']:.4g} is not {g.op} {ref:.4g}"))
    return failed


def _fmt(v) -> str:
    return "-" if v is None else f"{v:.4g}"


def markdown(rows: list[dict], command: str, gates_failed=None, gates=(), models: Sequence[str] = ()) -> str:
    lines = [f"Command: `{command}`", ""]
    if models:
        lines += ["Models: " + "; ".join(models), ""]
    lines += ["| task | base | extended | delta |", "|---|---|---|---|"]
    for r in rows:
        d = None if r["base"] is None or r["extended"] is None else r["extended"] - r["base"]
        lines.append(f"| {r['name']} | {_fmt(r['base'])} | {_fmt(r['extended'])} | "
                     f"{'-' if d is None else f'{d:+.4g}'} |")
    if gates:
        lines += ["", "Gates:"]
        failed = {g.text: why for g, why in (gates_failed or [])}
        for g in gates:
            lines.append(f"- `{g.text}`: {'FAILED (' + failed[g.text] + ')' if g.text in failed else 'pass'}")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, task, ylabel in ((axes[0], "passkey", "passkey accuracy"), (axes[1], "ppl", "perplexity (bucket)")):
        sel = [r for r in rows if r["task"] == task]
        if task == "ppl":  # the finest buckets only (a bucket split at the window is shown as its parts)
            sel = sorted((r for r in sel if not any(o is not r and r["length"][0] <= o["length"][0]
                                                    and o["length"][1] <= r["length"][1] for o in sel)),
                         key=lambda r: r["length"][1])
        for m, style in (("base", "o--"), ("extended", "s-")):
            pts = [((r["length"][1] if task == "ppl" else r["length"]), r[m]) for r in sel if r[m] is not None]
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], style, label=m)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("tokens" + (" (bucket end)" if task == "ppl" else ""))
        ax.set_ylabel(ylabel)
        if task == "ppl" and ax.has_data():
            ax.set_yscale("log")
        if ax.has_data():
            ax.legend()
        else:
            ax.text(0.5, 0.5, f"{task}: not run", ha="center", va="center", transform=ax.transAxes)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


