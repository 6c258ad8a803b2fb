"""Validation results: release gates ("ppl@8192-16384 <= 0.5x base"), decided on 95% bounds, the base-vs-extended
table with every cell's n and 95% interval and the paired comparison (:mod:`convert.evaluate.stats`), its Markdown
and its plot (error bars); and the check that a gate names what a run makes, before the run."""


from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence


from convert.errors import ConvertError
from convert.evaluate import stats
from convert.evaluate.engine import ACCURACY_TASKS, is_ruler

log = logging.getLogger(__name__)

# ------------------------------------------------------------------------------------------- gates and report
_GATE = re.compile(r"^\s*(passkey|ppl|ruler|[a-z_0-9-]+)@(\d+)(?:-(\d+))?\s*(>=|<=|>|<)\s*([0-9.eE+-]+)\s*"
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
    out = {}
    for pts in _ppl_points(rows, lengths, edges):
        prev_ll, prev_n, prev_len = 0.0, 0, 0
        for L, ll, n, *_ in pts:
            if n > prev_n:
                out.setdefault((prev_len, L), math.exp(-(ll - prev_ll) / (n - prev_n)))
            prev_ll, prev_n, prev_len = ll, n, L
    return out


def _ppl_points(rows: dict, lengths: Sequence[int], edges: Sequence[int] = ()) -> list[list[tuple]]:
    """The prefix points of the perplexity buckets, as :func:`ppl_buckets` takes them: (position, loglik sum, token
    count, per-document log-likelihoods or None, per-document tokens or None, the run whose block sums cover the
    positions before it), first for the lengths alone, then with the ``edges`` split in."""
    points = []
    for L in sorted(lengths):
        m = rows.get(L)
        if m is not None:
            points.append((L, m["loglik_sum"], m["token_count"], m.get("doc_ll"), m.get("doc_tokens"), m))
    split = []
    for e in sorted(set(int(x) for x in edges) - {p[0] for p in points}):
        above = next((p for p in points if p[0] > e), None)
        m = above[5] if above else None
        block, docs = (m or {}).get("block"), (m or {}).get("block_ll")
        if not docs or not block or e % block or any(len(d) <= e // block for d in docs):
            continue  # no block sums, the edge is not on a block boundary, or a document ends before it
        ll = [sum(d[: e // block]) for d in docs]
        split.append((e, sum(ll), e * len(docs), ll, [e] * len(docs), m))
    return [points, sorted(points + split, key=lambda p: p[0])]


def _ppl_units(prev: tuple | None, cur: tuple) -> tuple[list[float], list[int], str] | None:
    """The bootstrap units of the bucket between two points: its documents (negative log-likelihood and tokens of
    each, as the difference of the two prefixes), or, with one document, blocks of positions of the run that covers
    the bucket (:func:`convert.evaluate.stats.block_units`); None where the run kept no per-document sums."""
    ll, nt = cur[3], cur[4]
    if ll is None or nt is None or (prev is not None and (prev[3] is None or len(prev[3]) != len(ll))):
        return None
    pll = prev[3] if prev is not None else [0.0] * len(ll)
    pnt = prev[4] if prev is not None else [0] * len(ll)
    if len(ll) >= 2:
        return [-(a - b) for a, b in zip(ll, pll)], [a - b for a, b in zip(nt, pnt)], "documents"
    m = cur[5]
    if len(ll) == 1 and m.get("block_ll") and m.get("doc_tokens"):
        got = stats.block_units(m["block_ll"][0], int(m["block"]), prev[0] if prev else 0, cur[0],
                                int(m["doc_tokens"][0]))
        if got:
            return got[0], got[1], f"blocks of {got[2]} tokens"
    return None


def ppl_stats(rows: dict, lengths: Sequence[int], edges: Sequence[int] = ()) -> dict[tuple[int, int], dict]:
    """Per bucket (as :func:`ppl_buckets`): {"stat": value, n, 95% interval, method, unit; "units": (nll, tokens,
    unit) or None}.  The value is exp(sum nll / sum tokens) over the units where the run kept them (the bucket's
    perplexity from the per-length sums otherwise)."""
    values = ppl_buckets(rows, lengths, edges)
    out = {}
    for pts in _ppl_points(rows, lengths, edges):
        prev = None
        for p in pts:
            bucket = (prev[0] if prev else 0, p[0])
            if bucket in values and bucket not in out:
                units = _ppl_units(prev, p)
                st = stats.perplexity(units[0], units[1], units[2]) if units else None
                if st is None or st["value"] is None:
                    st = {"value": values[bucket], "n": len(p[3] or []), "lo": None, "hi": None,
                          "method": "none (no per-document sums)", "unit": "documents"}
                out[bucket] = {"stat": st, "units": units}
            prev = p
    return out


def _samples(m: dict | None) -> tuple[list[float] | None, list[str] | None]:
    m = m or {}
    return m.get("samples"), m.get("sample_ids")


def _pairs(b: dict | None, e: dict | None) -> bool:
    """The two models' samples are the same prompts: as many, and the same ids where both name them."""
    (bs, bi), (es, ei) = _samples(b), _samples(e)
    return bs is not None and es is not None and len(bs) == len(es) and (bi is None or ei is None or bi == ei)


def table_rows(results: list[dict], lengths: Sequence[int], edges: Sequence[int] = ()) -> list[dict]:
    """rows: {name, task, length, base, extended, stats: {base, extended}, paired}: passkey / passkey-multi / RULER per
    length, ppl per bucket (between lengths, and split at ``edges``: :func:`ppl_buckets`), ruler average.  ``stats``
    are each model's value with its n and 95% interval, ``paired`` extended vs base on the same samples (accuracy:
    the difference, perplexity: the ratio; :mod:`convert.evaluate.stats`); ``_units`` keeps the per-sample data the
    relative gates read (not written to the reports)."""
    by = {}
    for r in results:
        by.setdefault((r["model"], r["task"]), {})[r["length"]] = r["metrics"]
    rows = []
    tasks = sorted({r["task"] for r in results},
                   key=lambda t: (t not in ACCURACY_TASKS, t != "passkey", t != "ppl", t))
    models = ("base", "extended")
    for task in tasks:
        if task == "ppl":
            b = {m: ppl_stats(by.get((m, "ppl"), {}), lengths, edges) for m in models}
            for bucket in sorted(set(b["base"]) | set(b["extended"])):
                got = {m: b[m].get(bucket) for m in models}
                st = {m: (got[m] or {}).get("stat") for m in models}
                ub, ue = ((got[m] or {}).get("units") for m in models)
                paired = None
                if ub and ue and ub[2] == ue[2]:
                    paired = stats.paired_perplexity_ratio(ub[0], ub[1], ue[0], ue[1], ue[2])
                rows.append({"name": f"ppl {bucket[0]}-{bucket[1]}", "task": "ppl", "length": bucket,
                             **{m: (st[m] or {}).get("value") for m in models}, "stats": st, "paired": paired,
                             "_units": {"base": ub, "extended": ue}})
            continue
        key = "acc" if task in ACCURACY_TASKS else "score"
        for L in sorted(lengths):
            ms = {m: by.get((m, task), {}).get(L) for m in models}
            vals = {m: (ms[m] or {}).get(key) for m in models}
            st = {m: stats.accuracy(_samples(ms[m])[0]) if _samples(ms[m])[0] is not None else None for m in models}
            paired = stats.paired_accuracy(ms["base"]["samples"], ms["extended"]["samples"]) \
                if _pairs(ms["base"], ms["extended"]) else None
            rows.append({"name": f"{task} @{L}", "task": task, "length": L, **vals, "stats": st, "paired": paired,
                         "_units": {m: [_samples(ms[m])[0]] if _samples(ms[m])[0] is not None else None
                                    for m in models}})
    ruler = [t for t in tasks if is_ruler(t)]
    if ruler:
        for L in sorted(lengths):
            vals, st, groups = {}, {}, {}
            for m in models:
                got = [by.get((m, t), {}).get(L) or {} for t in ruler]
                xs = [g.get("score") for g in got if g.get("score") is not None]
                vals[m] = sum(xs) / len(xs) if xs else None
                gs = [g.get("samples") for g in got]
                groups[m] = gs if gs and all(x is not None for x in gs) else None
                st[m] = stats.mean_of_means(groups[m]) if groups[m] else None
            paired = stats.paired_means(groups["base"], groups["extended"]) \
                if groups["base"] and groups["extended"] else None
            rows.append({"name": f"ruler average @{L}", "task": "ruler", "length": L, **vals, "stats": st,
                         "paired": paired, "_units": groups})
    return rows


def public_row(row: dict) -> dict:
    """A row as the reports write it (no per-sample data; a bucket as a list)."""
    out = {k: v for k, v in row.items() if not k.startswith("_")}
    if isinstance(out.get("length"), tuple):
        out["length"] = list(out["length"])
    return out


_OPS = {">=": lambda a, b: a >= b, "<=": lambda a, b: a <= b, ">": lambda a, b: a > b, "<": lambda a, b: a < b}


def check_gates(rows: list[dict], gates: Sequence[Gate]) -> list[tuple[Gate, str]]:
    """(gate, reason) for every failed gate.  A gate holds when its 95% bound does: 'acc >= v' when the interval's
    lower bound is >= v, 'ppl <= v' when its upper bound is <= v; a relative gate reads the paired interval of the
    same samples: 'ppl <= v x base' holds when the upper bound of perplexity(extended) / perplexity(base) is <= v,
    'acc >= v x base' when the lower bound of acc(extended) - v acc(base) is >= 0."""
    failed = []
    for g in gates:
        want = (g.length, g.upper) if g.metric == "ppl" else g.length
        row = next((r for r in rows if r["task"] == g.metric and r["length"] == want), None)
        if row is None or row["extended"] is None:
            failed.append((g, "not measured in this run (add the task and length)"))
            continue
        lower = g.op in (">=", ">")  # the bound that must hold
        if g.relative:
            if row["base"] is None:
                failed.append((g, "needs the base model (--base)"))
                continue
            units = row.get("_units") or {}
            if g.metric == "ppl":
                s, ref, what = row.get("paired"), g.value, "perplexity ratio extended / base"
            else:
                ub, ue = units.get("base"), units.get("extended")
                s = stats.paired_means(ub, ue, g.value) if ub and ue else None
                ref, what = 0.0, f"extended - {g.value:g} x base"
        else:
            s, ref, what = (row.get("stats") or {}).get("extended"), g.value, "extended"
        bound = None if s is None else s.get("lo" if lower else "hi")
        if bound is None:
            n = None if s is None else s.get("n")
            failed.append((g, f"{what}: no 95% interval (n={n}; needs per-sample scores and at least 2 samples)"))
            continue
        if not _OPS[g.op](bound, ref):
            failed.append((g, f"{what} {stats.fmt_interval(s)} (n={s['n']}, 95%): its "
                              f"{'lower' if lower else 'upper'} bound {bound:.4g} is not {g.op} {ref:.4g}"))
    return failed


def _bucket_points(lengths: Sequence[int]) -> list[int]:
    return sorted({0, *(int(x) for x in lengths)})


def made_buckets(lengths: Sequence[int], edges: Sequence[int] = ()) -> set[tuple[int, int]]:
    """The perplexity buckets a run at ``lengths`` reports: between consecutive lengths (from 0), and each bucket an
    edge (the base's window) falls inside split in two at it (the whole bucket stays)."""
    pts = _bucket_points(lengths)
    out = set(zip(pts, pts[1:]))
    for e in edges:
        if e is not None and e not in pts and 0 < e < pts[-1]:
            a, b = max(p for p in pts if p < e), min(p for p in pts if p > e)
            out |= {(a, e), (e, b)}
    return out


def gate_problems(gates: Sequence[str | Gate], tasks: Sequence[str], lengths: Sequence[int],
                  window: int | None = None, window_known: bool = True) -> list[str]:
    """Why each gate cannot be decided by a run of ``tasks`` at ``lengths``: it names a task the run does not do, a
    length it does not score, or a perplexity bucket it does not make (buckets between lengths, split at the base's
    ``window``).  With ``window_known`` false (a recipe whose source is not on this machine yet) a gate may split a
    bucket at one position, the same for every gate: the base's window, checked when the run reads it."""
    parsed = [g if isinstance(g, Gate) else Gate.parse(g) for g in gates]
    lengths = sorted(int(x) for x in lengths)
    problems, ls = [], ", ".join(map(str, lengths))
    ruler = [t for t in tasks if is_ruler(t)]
    guessed: dict[int, list[str]] = {}
    for g in parsed:
        if g.metric == "ppl":
            if "ppl" not in tasks:
                problems.append(f"gate '{g.text}' needs the ppl task (tasks: {', '.join(tasks)})")
                continue
            bucket = (g.length, g.upper)
            made = made_buckets(lengths, [window] if window else [])
            if bucket in made:
                continue
            if not window_known:
                pts = _bucket_points(lengths)
                odd = [x for x in bucket if x not in pts]
                if len(odd) == 1 and 0 < odd[0] < pts[-1] and bucket in made_buckets(lengths, odd):
                    guessed.setdefault(odd[0], []).append(g.text)
                    continue
            names = ", ".join(f"{a}-{b}" for a, b in sorted(made))
            problems.append(f"gate '{g.text}' names perplexity bucket {g.length}-{g.upper}, which the run does not "
                            f"make: lengths {ls} make {names}"
                            + (f" (split at the base's window {window})" if window else ""))
            continue
        if g.upper is not None:
            problems.append(f"gate '{g.text}': only ppl gates name a bucket; {g.metric} is scored per length")
            continue
        if g.metric == "ruler":
            if not ruler:
                problems.append(f"gate '{g.text}' needs a RULER task (tasks: {', '.join(tasks)})")
                continue
        elif g.metric not in tasks:
            problems.append(f"gate '{g.text}' names task {g.metric}, which is not among the tasks "
                            f"({', '.join(tasks)})")
            continue
        if g.length not in lengths:
            problems.append(f"gate '{g.text}' names length {g.length}; the run scores {g.metric} at {ls}")
    if len(guessed) > 1:
        problems.append("gates split perplexity buckets at several positions (" + "; ".join(
            f"{e}: {', '.join(ts)}" for e, ts in sorted(guessed.items())) + "); a run splits them only at the base's "
            "window")
    return problems


def gate_sample_problems(gates: Sequence[str | Gate], tasks: Sequence[str], limit: int | None) -> list[str]:
    """Absolute accuracy gates ('passkey@L >= v') that no result can pass with the samples the run scores: even all
    n correct give a 95% Wilson lower bound n / (n + z^2) below v.  n is ``limit`` prompts (passkey: 30 without a
    limit, its dataset), K x prompts for passkey-multi (at most its MAX_KEYS keys per prompt), ``limit`` per task for
    RULER (500 without a limit, its generators')."""
    from convert.evaluate.tasks.passkey_multi import MAX_KEYS

    problems = []
    for g in (x if isinstance(x, Gate) else Gate.parse(x) for x in gates):
        if g.relative or g.op not in (">=", ">") or g.metric == "ppl":
            continue
        if g.metric == "passkey":
            n = limit or 30
        elif g.metric == "passkey-multi":
            n = MAX_KEYS * (limit or 5)
        elif g.metric == "ruler":
            n = (limit or 500) * max(1, len([t for t in tasks if is_ruler(t)]))
        else:
            n = limit or 500
        best = stats.wilson(n, n)[0]
        if not _OPS[g.op](best, g.value):
            need = "no n" if g.value >= 1 else \
                f"n >= {math.ceil(stats.Z95 ** 2 * g.value / (1 - g.value) + (1e-9 if g.op == '>' else 0))}"
            problems.append(f"gate '{g.text}' cannot hold with n = {n} samples: even {n} of {n} correct give a 95% "
                            f"lower bound of {best:.3f}; it needs {need} (raise the limit"
                            + (", or gate on passkey-multi, K keys per prompt" if g.metric == "passkey" else "")
                            + ")")
    return problems


def _fmt(v) -> str:
    return "-" if v is None else f"{v:.4g}"


def _n_text(s: dict) -> str:
    unit = s.get("unit") or ""
    if unit.startswith("blocks of "):
        return f"n={s['n']} blocks of {unit.removeprefix('blocks of ')}"
    return f"n={s['n']}" + (" docs" if unit == "documents" else "")


def cell(s: dict | None, value=None) -> str:
    """'0.96 [0.9, 0.98] (n=50)': a value, its 95% interval and n (the value alone where there is no interval)."""
    if not s or s.get("value") is None:
        return _fmt(value)
    return f"{stats.fmt_interval(s)} ({_n_text(s)})"


def paired_cell(row: dict) -> str:
    """The paired column: extended - base for accuracies, extended / base for perplexity, with the paired
    bootstrap's 95% interval."""
    s = row.get("paired")
    if not s or s.get("value") is None:
        b, e = row["base"], row["extended"]
        if b is None or e is None:
            return "-"
        return f"x{e / b:.4g}" if row["task"] == "ppl" and b else f"{e - b:+.4g}"
    if row["task"] == "ppl":
        txt = f"x{s['value']:.4g}"
        return txt + (f" [{s['lo']:.4g}, {s['hi']:.4g}]" if s.get("lo") is not None else "")
    txt = f"{s['value']:+.4g}"
    return txt + (f" [{s['lo']:+.4g}, {s['hi']:+.4g}]" if s.get("lo") is not None else "")


INTERVALS_NOTE = ("Cells: value [95% interval] (n). Accuracy: Wilson score interval over prompts (passkey-multi: K "
                  "keys per prompt, each a sample); perplexity: percentile bootstrap ({r} resamples) over documents, "
                  "or over blocks of positions when there is one window; RULER average: stratified bootstrap over "
                  "each task's prompts. Paired: extended - base (accuracy) or extended / base (perplexity) on the "
                  "same samples, paired bootstrap. Gates hold when their 95% bound does.").format(r=stats.RESAMPLES)


def markdown(rows: list[dict], command: str, gates_failed=None, gates=(), models: Sequence[str] = ()) -> str:
    lines = [f"Command: `{command}`", ""]
    if models:
        lines += ["Models: " + "; ".join(models), ""]
    lines += ["| task | base | extended | extended vs base (paired) |", "|---|---|---|---|"]
    for r in rows:
        st = r.get("stats") or {}
        lines.append(f"| {r['name']} | {cell(st.get('base'), r['base'])} | {cell(st.get('extended'), r['extended'])} "
                     f"| {paired_cell(r)} |")
    lines += ["", INTERVALS_NOTE]
    if gates:
        lines += ["", "Gates:"]
        failed = {g.text: why for g, why in (gates_failed or [])}
        for g in gates:
            lines.append(f"- `{g.text}`: {'FAILED (' + failed[g.text] + ')' if g.text in failed else 'pass'}")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path) -> None:
    """Accuracy by length (passkey, passkey-multi) and perplexity by bucket, base and extended, each point with its
    95% interval as an error bar."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    acc_tasks = [t for t in ACCURACY_TASKS if any(r["task"] == t for r in rows)] or ["passkey"]
    for ax, tasks, ylabel in ((axes[0], acc_tasks, "accuracy (95% interval)"),
                              (axes[1], ["ppl"], "perplexity by bucket (95% interval)")):
        for task in tasks:
            sel = [r for r in rows if r["task"] == task]
            if task == "ppl":  # the finest buckets only (a bucket split at the window is shown as its parts)
                sel = sorted((r for r in sel if not any(o is not r and r["length"][0] <= o["length"][0]
                                                        and o["length"][1] <= r["length"][1] for o in sel)),
                             key=lambda r: r["length"][1])
            for m, style in (("base", "o--"), ("extended", "s-")):
                pts = [((r["length"][1] if task == "ppl" else r["length"]), r[m], (r.get("stats") or {}).get(m))
                       for r in sel if r[m] is not None]
                if not pts:
                    continue
                shift = 0.97 if m == "base" else 1.03  # side by side on the log axis, so the bars do not hide each other
                xs, ys = [p[0] * shift for p in pts], [p[1] for p in pts]
                err = [[max(0.0, y - s["lo"]) if s and s.get("lo") is not None else 0.0 for _, y, s in pts],
                       [max(0.0, s["hi"] - y) if s and s.get("hi") is not None else 0.0 for _, y, s in pts]]
                label = m if len(tasks) == 1 else f"{m} {task}"
                ax.errorbar(xs, ys, yerr=err, fmt=style, capsize=3, label=label)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("tokens" + (" (bucket end)" if tasks == ["ppl"] else ""))
        ax.set_ylabel(ylabel)
        if tasks == ["ppl"] and ax.has_data():
            ax.set_yscale("log")
        if ax.has_data():
            ax.legend()
        else:
            ax.text(0.5, 0.5, f"{', '.join(tasks)}: not run", ha="center", va="center", transform=ax.transAxes)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
