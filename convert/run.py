"""`dprope run RECIPE`: source -> factors -> bake -> [train] -> validate -> export -> verify in one run directory.

Each stage records a fingerprint of its inputs (its recipe section, the fingerprints of the stages it reads, the
tool version) in ``<run>/.stages/<stage>.json`` after its outputs are complete.  A stage whose fingerprint is
unchanged and whose outputs exist is skipped, so a run resumes after a failure or Ctrl-C, and a changed input redoes
that stage and everything after it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import dprope

from .errors import ConvertError
from .recipe import STAGES, Recipe, load_recipe, resolve_source

log = logging.getLogger(__name__)


@dataclass
class StagePlan:
    name: str
    fingerprint: str
    action: str  # "run" | "skip (done)" | "skip (not selected)" | "skip (no GPU)" | "skip (not in recipe)"


def _fp(*parts) -> str:
    return hashlib.sha256(json.dumps([dprope.__version__, *parts], sort_keys=True, default=str).encode()) \
        .hexdigest()[:16]


class RunDir:
    def __init__(self, root: Path):
        self.root = Path(root)
        self.hf = self.root / "hf"
        self.trained = self.root / "trained"
        self.validation = self.root / "validation"
        self.export = self.root / "export"
        self.stages = self.root / ".stages"

    def done(self, stage: str) -> dict | None:
        f = self.stages / f"{stage}.json"
        return json.loads(f.read_text()) if f.exists() else None

    def mark(self, stage: str, fingerprint: str, **info) -> None:
        self.stages.mkdir(parents=True, exist_ok=True)
        tmp = self.stages / f".{stage}.json.partial"
        tmp.write_text(json.dumps({"fingerprint": fingerprint, **info}, indent=1, default=str))
        tmp.replace(self.stages / f"{stage}.json")

    def unmark(self, stage: str) -> None:
        (self.stages / f"{stage}.json").unlink(missing_ok=True)

    def model_dir(self, recipe: Recipe) -> Path:
        """The checkpoint the later stages read: the trained one when there is a train stage."""
        return self.trained if recipe.train and self.done("train") and (self.trained / "config.json").exists() \
            else self.hf


def _gpu_available() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:
        return False


def fingerprints(recipe: Recipe, release: bool) -> dict[str, str]:
    """Each stage's input fingerprint, chained through the stages it reads."""
    src = _fp("source", recipe.source)
    factors = _fp("factors", src, recipe.target_length, recipe.method.model_dump())
    bake = _fp("bake", factors)
    train = _fp("train", bake, recipe.train.model_dump() if recipe.train else None)
    model = train if recipe.train else bake
    val = recipe.validate_.resolved(release)
    validate = _fp("validate", model, val.model_dump(), release)
    export = _fp("export", model, recipe.export.model_dump())
    verify = _fp("verify", export)
    return dict(source=src, factors=factors, bake=bake, train=train, validate=validate, export=export, verify=verify)


def plan(recipe: Recipe, run: RunDir, start: str | None = None, stop: str | None = None, release: bool = False,
         force_cpu: bool = False) -> list[StagePlan]:
    fps = fingerprints(recipe, release)
    lo = STAGES.index(start) if start else 0
    hi = STAGES.index(stop) if stop else len(STAGES) - 1
    if lo > hi:
        raise ConvertError(f"--from {start} comes after --to {stop}; stages run in order: {' -> '.join(STAGES)}")
    out = []
    for i, s in enumerate(STAGES):
        done = run.done(s)
        if s == "train" and recipe.train is None:
            out.append(StagePlan(s, fps[s], "skip (not in recipe)"))
            continue
        if not lo <= i <= hi:
            out.append(StagePlan(s, fps[s], "skip (not selected)"))
            continue
        if s == "train" and not (_gpu_available() or force_cpu or recipe.train.device == "cpu"):
            out.append(StagePlan(s, fps[s], "skip (no GPU: pass --force-cpu for a CPU smoke run)"))
            continue
        # fingerprints chain through the stages each one reads, so a changed input reaches exactly its dependants
        fresh = done is not None and done.get("fingerprint") == fps[s]
        out.append(StagePlan(s, fps[s], "skip (done)" if fresh else "run"))
    return out


def run_recipe(recipe_path: Path, run_dir: Path | None = None, start: str | None = None, stop: str | None = None,
               dry_run: bool = False, release: bool = False, force_cpu: bool = False, source: str | None = None,
               echo: Callable[[str], None] = print) -> dict:
    """Run (or plan) a recipe; returns a summary with the output paths and, when run, validation and verify."""
    overrides = {"source": source} if source else None
    recipe = load_recipe(recipe_path, overrides)
    run = RunDir(run_dir or Path("runs") / recipe.name)
    stages = plan(recipe, run, start, stop, release, force_cpu)
    echo(f"recipe {recipe.name}: {recipe_path} -> {run.root}")
    for st in stages:
        echo(f"  {st.name:<9} {st.action}")
    summary = {"recipe": recipe.name, "run_dir": str(run.root), "stages": {s.name: s.action for s in stages}}
    if dry_run:
        return summary
    run.root.mkdir(parents=True, exist_ok=True)
    (run.root / "recipe.yaml").write_text(Path(recipe_path).read_text())
    for st in stages:
        if st.action != "run":
            continue
        run.unmark(st.name)  # an interrupted stage is never taken for done
        echo(f"== {st.name}")
        info = STAGE_FUNCS[st.name](recipe, run, release=release, force_cpu=force_cpu, echo=echo) or {}
        run.mark(st.name, st.fingerprint, **info)
        summary[st.name] = info
    summary["model_dir"] = str(run.model_dir(recipe))
    return summary


# ------------------------------------------------------------------------------------------- stages
def _stage_source(recipe: Recipe, run: RunDir, **_) -> dict:
    from .source import open_source

    given = resolve_source(recipe.source)
    try:
        src = open_source(given)
    except ConvertError as e:
        hint = f"\n{recipe.source_hint}" if recipe.source_hint else ""
        raise ConvertError(f"{e}{hint}") from None
    return {"source": given, "hf_dir": str(src.path), "kind": src.kind, "arch": src.spec.arch.hf_class,
            "original_length": src.spec.original_length}


def _source(recipe: Recipe, run: RunDir):
    from .source import open_source

    info = run.done("source")
    return open_source(info["source"] if info else resolve_source(recipe.source))


def _plan_of(recipe: Recipe):
    from .bake import make_plan

    a = recipe.method.plan_args()
    return make_plan(a.pop("method"), recipe.target_length, original_length=recipe.original_length, **a)


def _stage_factors(recipe: Recipe, run: RunDir, **_) -> dict:
    from .bake import compute

    src = _source(recipe, run)
    result = compute(src.spec, _plan_of(recipe))
    run.root.mkdir(parents=True, exist_ok=True)
    (run.root / "factors.json").write_text(json.dumps(result.to_dict(), indent=1))
    return {"counts": result.counts(), "disturbance": result.disturbance}


def _stage_bake(recipe: Recipe, run: RunDir, **_) -> dict:
    from .bake import bake

    result = dprope.DPRoPEResult.from_dict(json.loads((run.root / "factors.json").read_text()))
    bake(_source(recipe, run), run.hf, _plan_of(recipe), force=True, plot=True, result=result)
    return {"hf": str(run.hf)}


def _stage_train(recipe: Recipe, run: RunDir, force_cpu: bool = False, **_) -> dict:
    from .train import train_from_recipe

    return train_from_recipe(recipe, run.hf, run.trained, force_cpu=force_cpu)


def _stage_validate(recipe: Recipe, run: RunDir, release: bool = False, echo=print, **_) -> dict:
    from .validate import validate

    v = recipe.validate_.resolved(release)
    src = _source(recipe, run)
    base = src.gguf_path or src.path
    res = validate(run.model_dir(recipe), base, v.lengths, v.tasks, v.limit, run.validation, v.corpus,
                   v.gates if release else (), command=f"dprope run {recipe.name}{' --release' if release else ''}")
    echo(res.markdown)
    if release and res.failed:
        raise ConvertError("release gate(s) failed: " + "; ".join(f"{g.text} ({why})" for g, why in res.failed))
    # the card of the checkpoint links the report
    card = run.model_dir(recipe) / "README.md"
    if card.exists():
        from .validate import _link_card

        _link_card(run.model_dir(recipe), res.markdown)
    return {"report": str(run.validation / "validation.md")}


def _stage_export(recipe: Recipe, run: RunDir, **_) -> dict:
    from .export import export_outputs

    src = _source(recipe, run)
    base_gguf = src.gguf_path if recipe.export.base_quant and src.gguf_path else None
    if run.export.exists():
        shutil.rmtree(run.export)
    m = export_outputs(run.model_dir(recipe), run.export, recipe.export.gguf, recipe.export.rope_layout, base_gguf,
                       name=recipe.name)
    return {"gguf": [g["file"] for g in m["gguf"]]}


def _stage_verify(recipe: Recipe, run: RunDir, echo=print, **_) -> dict:
    from .verify import verify

    report = verify(run.export if run.export.exists() else run.model_dir(recipe), run.model_dir(recipe))
    echo(report.table())
    if not report.ok:
        raise ConvertError("verify failed: " + "; ".join(f"{c.name} [{c.target}]: {c.detail}"
                                                       for c in report.failed()))
    return {"ok": True}


STAGE_FUNCS = {"source": _stage_source, "factors": _stage_factors, "bake": _stage_bake, "train": _stage_train,
               "validate": _stage_validate, "export": _stage_export, "verify": _stage_verify}
