"""`dprope run RECIPE`: source -> factors -> bake -> [train] -> export -> validate -> verify in one run directory.

Validation follows the export so that it can measure the exported GGUFs (``validate.outputs``) beside the checkpoint.

Each stage records, in ``<run>/.stages/<stage>.json`` once its outputs are complete, what it read (content digests:
the source's files, factors.json, the model directory it used, the training data or corpus, and its options) and
the sha256 of every file it wrote.  On the next run a stage is done only when what it would read now has the same
digests and its outputs are still there, unaltered; otherwise it runs again, with the reason shown (``--dry-run``
shows the plan), and so does every later stage whose inputs it rewrites.  A stage that ran is re-checked by content
before the next one starts, so a re-baked but identical model is not validated twice.

One run at a time per directory: ``<run>/.lock`` is held with flock(2), which the kernel releases when the holder
exits or is killed, so a crashed run never leaves a stuck lock.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import dprope

from convert.io.files import Memo, combine, run_memo, write_atomic
from convert.errors import ConvertError
from convert.pipeline.recipe import Recipe, load_recipe, resolve_source
from convert.names import (CARD_FILE, MANIFEST, gguf_file_name, RUN_EXPORT, RUN_FACTORS, RUN_HF, RUN_SEARCH, RUN_STAGES, RUN_TRAINED,
                           RUN_VALIDATION, STAGES, VERIFY_FILE)

log = logging.getLogger(__name__)

RECORD_VERSION = 2
# files later stages rewrite inside a checkpoint (the card's sections, verify's record): not part of the model a
# stage reads, and only their presence is an output of the stage that created them
DOC_FILES = ("README.md", "verify.json")


@dataclass
class StagePlan:
    name: str
    fingerprint: str
    action: str  # "run" | "skip (done)" | "skip (not selected)" | "skip (no GPU...)" | "skip (not in recipe)"
    reason: str = ""  # why it runs: "never ran", "source file changed", "outputs missing: hf/config.json", ...
    error: str = ""  # it cannot run here (train.device: cuda without a GPU)
    inputs: dict | None = None  # the content digests of what it reads now
    model: Path | None = None  # the checkpoint it reads (validate, export, verify)

    @property
    def line(self) -> str:
        text = f"{self.action} ({self.reason})" if self.action == "run" and self.reason else self.action
        return f"{text}; will fail: {self.error}" if self.error else text


def _fp(*parts) -> str:
    return combine([dprope.__version__, *parts])[:16]


class RunDir:
    def __init__(self, root: Path):
        self.root = Path(root)
        self.hf = self.root / RUN_HF
        self.trained = self.root / RUN_TRAINED
        self.validation = self.root / RUN_VALIDATION
        self.export = self.root / RUN_EXPORT
        self.stages = self.root / RUN_STAGES
        self.model: Path | None = None  # the checkpoint later stages read, decided by the plan

    def done(self, stage: str) -> dict | None:
        f = self.stages / f"{stage}.json"
        try:
            return json.loads(f.read_text()) if f.exists() else None
        except json.JSONDecodeError:
            return None

    def mark(self, stage: str, fingerprint: str, **info) -> None:
        self.stages.mkdir(parents=True, exist_ok=True)
        write_atomic(self.stages / f"{stage}.json",
                     json.dumps({"fingerprint": fingerprint, **info}, indent=1, default=str))
        (self.stages / f"{stage}.started").unlink(missing_ok=True)

    def unmark(self, stage: str) -> None:
        """Before a stage runs: its record goes (an interrupted stage is never taken for done) and a marker says it
        started, so the next plan can say it was interrupted."""
        self.stages.mkdir(parents=True, exist_ok=True)
        (self.stages / f"{stage}.json").unlink(missing_ok=True)
        (self.stages / f"{stage}.started").write_text(f"{os.getpid()} {time.time():.0f}\n")

    def interrupted(self, stage: str) -> bool:
        return (self.stages / f"{stage}.started").exists()

    def model_dir(self, recipe: Recipe) -> Path:
        """The checkpoint the later stages read: the trained one when the train stage is done and current."""
        if self.model is not None:
            return self.model
        return self.trained if recipe.train and self.done("train") and (self.trained / "config.json").exists() \
            else self.hf


class RunLock:
    """An exclusive flock(2) on ``<run>/.lock`` holding the owner's pid.  The kernel drops the lock when the
    process exits or is killed, so the file a crashed run leaves behind blocks nobody."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.path = self.root / ".lock"
        self._f = None

    def holder(self) -> str | None:
        """The pid of the process holding the lock, or None when it is free (without taking it)."""
        if not self.path.exists():
            return None
        with open(self.path) as f:
            try:
                fcntl.flock(f, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except OSError as e:
                if e.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                    raise
                return f.read().strip() or "unknown"
            fcntl.flock(f, fcntl.LOCK_UN)
            return None

    def __enter__(self) -> "RunLock":
        self.root.mkdir(parents=True, exist_ok=True)
        f = open(self.path, "a+")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                f.close()
                raise
            f.seek(0)
            pid = f.read().strip() or "unknown"
            f.close()
            raise ConvertError(
                f"run directory {self.root} is in use by another `dprope run` (pid {pid}); wait for it to finish or "
                f"stop it (kill {pid}), or pass another --run-dir. A killed run releases the lock by itself") from None
        f.seek(0)
        f.truncate()
        f.write(f"{os.getpid()}\n")
        f.flush()
        self._f = f
        return self

    def __exit__(self, *exc) -> None:
        if self._f is not None:
            fcntl.flock(self._f, fcntl.LOCK_UN)
            self._f.close()
            self._f = None


def _gpu_available() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:
        return False


# ------------------------------------------------------------------------------------------- what stages read
def _source_path(recipe: Recipe) -> Path | None:
    """The file or directory the recipe's source names, or None when it is not on this machine."""
    try:
        given = resolve_source(recipe.source)
    except ConvertError:
        return None
    p = Path(given)
    if p.exists():
        return p
    if given.count("/") == 1 and not given.startswith((".", "/")):
        from convert.formats.checkpoint import _hub_snapshot

        try:
            return _hub_snapshot(given)
        except ConvertError:
            return None
    return None


class Inputs:
    """Content digests of what each stage reads, computed once per plan (through a stat-checked memo)."""

    def __init__(self, recipe: Recipe, run: RunDir, memo: Memo, release: bool):
        self.recipe, self.run, self.memo, self.release = recipe, run, memo, release
        self._cache: dict = {}

    def _once(self, key, fn):
        if key not in self._cache:
            self._cache[key] = fn()
        return self._cache[key]

    def source(self) -> str | None:
        def digest():
            p = _source_path(self.recipe)
            if p is None:
                return None
            if p.is_file():
                return self.memo.file_digest(p)
            # transformers reads the top level of a checkpoint directory (subfolders such as original/ are not read)
            return combine(self.memo.tree(p, recursive=False))

        return self._once("source", digest)

    def model(self, d: Path) -> str | None:
        def digest():
            if d.is_file():  # a GGUF extended in place: the later stages read the source file itself
                return self.memo.file_digest(d)
            files = self.memo.tree(d, exclude=DOC_FILES)
            return combine({"dir": d.name, "files": files}) if files else None

        return self._once(("model", str(d)), digest)

    def path(self, given: str | None) -> str | None:
        """A data or corpus path by content (a folder by all its files); anything else by its text."""
        if given is None:
            return None
        p = Path(given)
        if p.is_file():
            return self.memo.file_digest(p)
        if p.is_dir():
            return combine(self.memo.tree(p))
        return f"text:{given}"

    def file(self, p: Path) -> str | None:
        return self.memo.file_digest(p) if p.is_file() else None

    def of(self, stage: str, model: Path) -> dict:
        return STAGE_TABLE[stage].inputs(self, model)


def _tree(memo: Memo, d: Path, presence: tuple = (), skip: tuple = ()) -> dict[str, str | None]:
    """{<folder>/<file>: sha256} of a folder; files in ``presence`` are recorded by presence only (None)."""
    out = {f"{d.name}/{k}": v for k, v in memo.tree(d, exclude=presence + skip).items()}
    out.update({f"{d.name}/{k}": None for k in presence if (d / k).is_file()})
    return out


def outputs_of(stage: str, run: RunDir, model: Path, memo: Memo) -> dict[str, str | None]:
    """{path relative to the run directory: sha256} of what a stage wrote; None marks a file whose presence is
    recorded but whose content later stages rewrite (the card, the manifest)."""
    return STAGE_TABLE[stage].outputs(run, model, memo)


REASONS = {"options": "options changed", "source": "source file changed", "factors": "factors.json changed",
           "model": "input model changed", "data": "training data changed", "corpus": "corpus changed",
           "export": "exported files changed"}


def _listing(paths: list[str], n: int = 3) -> str:
    return ", ".join(paths[:n]) + (f" and {len(paths) - n} more" if len(paths) > n else "")


def _stale(stage: str, rec: dict | None, inputs: dict, run: RunDir, memo: Memo,
           first: str | None = None) -> str | None:
    """Why a stage must run again, or None when it is done: no record, changed inputs, missing or altered outputs.
    ``first``: a stage whose outputs this one reads runs before it (the inputs are compared once it has)."""
    if rec is None:
        return "interrupted last time" if run.interrupted(stage) else "never ran"
    if rec.get("record") != RECORD_VERSION or "inputs" not in rec:
        return "recorded by an older dprope"
    old = rec["inputs"]
    if old.get("model_dir") != inputs.get("model_dir"):
        why = [f"input model changed ({old.get('model_dir')}/ -> {inputs.get('model_dir')}/)"]
    elif first:
        why = [first]
    else:
        why = [REASONS.get(k, f"{k} changed") for k in inputs if k != "model_dir" and old.get(k) != inputs[k]]
    missing, changed = [], []
    for rel, digest in rec.get("outputs", {}).items():
        p = run.root / rel
        if not p.is_file():
            missing.append(rel)
        elif digest is not None and memo.file_digest(p) != digest:
            changed.append(rel)
    if missing:
        why.append(f"outputs missing: {_listing(missing)}")
    if changed:
        why.append(f"outputs changed: {_listing(changed)}")
    return "; ".join(why) or None


def reads(stage: str, recipe: Recipe, release: bool) -> tuple[str, ...]:
    """The stages whose outputs ``stage`` reads ("model": train's when later stages read trained/, else bake's);
    validate also reads the export when it measures GGUFs."""
    if stage == "validate" and any(form != "hf" for form in recipe.validate_.resolved(release).outputs):
        return STAGE_TABLE[stage].reads + ("export",)
    return STAGE_TABLE[stage].reads


def validated_ggufs(recipe: Recipe, run: RunDir, release: bool) -> list[tuple[str, Path]]:
    """(form, GGUF path) for every exported GGUF the run validates (validate.outputs other than hf)."""
    from convert.names import gguf_file_name  # noqa: F811

    return [(form, run.export / gguf_file_name(recipe.name, form))
            for form in recipe.validate_.resolved(release).outputs if form != "hf"]


def _span(start: str | None, stop: str | None) -> tuple[int, int]:
    lo = STAGES.index(start) if start else 0
    hi = STAGES.index(stop) if stop else len(STAGES) - 1
    if lo > hi:
        raise ConvertError(f"--from {start} comes after --to {stop}; stages run in order: {' -> '.join(STAGES)}")
    return lo, hi


def plan(recipe: Recipe, run: RunDir, start: str | None = None, stop: str | None = None, release: bool = False,
         force_cpu: bool = False, memo: Memo | None = None) -> list[StagePlan]:
    """What a run would do now, stage by stage, and why.  Sets ``run.model`` to the checkpoint later stages read."""
    from convert.stages.train import pick_device

    lo, hi = _span(start, stop)
    memo = memo or run_memo(run.stages / "digests.json")
    ins = Inputs(recipe, run, memo, release)
    model, model_stage = run.hf, "bake"
    if recipe.export.in_place:
        model, model_stage = _source_path(recipe) or run.hf, "source"
    actions: dict[str, str] = {}
    out = []
    for i, s in enumerate(STAGES):
        if s == "train" and recipe.train is None:
            out.append(StagePlan(s, "", "skip (not in recipe)"))
            continue
        if s == "bake" and recipe.export.in_place:
            out.append(StagePlan(s, "", "skip (export.in_place: the export stage extends the GGUF itself)"))
            continue
        if s == "validate" and not recipe.validate_.resolved(release).tasks:
            out.append(StagePlan(s, "", "skip (validate.tasks is empty)"))
            continue
        inputs = ins.of(s, model)
        if "model" in inputs:
            inputs["model_dir"] = model.name
        fp = _fp(s, inputs)
        # what it reads is about to be rewritten: compared by content once that stage has run
        first = [model_stage if d == "model" else d for d in reads(s, recipe, release)]
        first = [d for d in first if actions.get(d) == "run"]
        what = {"factors": "factors.json", "export": "exported files"}
        first_why = f"input {what.get(first[0], 'model')} may change: {first[0]} runs first" if first else None
        why = _stale(s, run.done(s), inputs, run, memo, first_why)
        st = StagePlan(s, fp, "run" if why else "skip (done)", why or "", inputs=inputs, model=model)
        if not lo <= i <= hi:
            st = StagePlan(s, fp, "skip (not selected)", inputs=inputs, model=model)
        elif s == "train" and why:
            try:
                pick_device(recipe.train.device, force_cpu, _gpu_available())
            except ConvertError as e:
                if recipe.train.device == "cuda":
                    st.error = str(e)
                else:
                    st = StagePlan(s, fp, "skip (no GPU: pass --force-cpu for a CPU smoke run)", inputs=inputs,
                                   model=model)
        if s == "train":  # later stages read the trained model only when it is current (or about to be)
            if st.action == "run" or why is None:
                model, model_stage = run.trained, "train"
            elif (run.trained / "config.json").exists():  # say so: the stale trained model is not used
                st.action += f"; {run.trained.name}/ is out of date, later stages read {run.hf.name}/"
        actions[s] = st.action
        out.append(st)
    run.model = model
    return out


def run_recipe(recipe_path: Path, run_dir: Path | None = None, start: str | None = None, stop: str | None = None,
               dry_run: bool = False, release: bool = False, force_cpu: bool = False, source: str | None = None,
               echo: Callable[[str], None] = print) -> dict:
    """Run (or plan) a recipe; returns a summary with the output paths and, when run, validation and verify."""
    overrides = {"source": source} if source else None
    recipe = load_recipe(recipe_path, overrides)
    run = RunDir(run_dir or Path("runs") / recipe.name)
    _span(start, stop)
    if dry_run:
        stages = plan(recipe, run, start, stop, release, force_cpu, memo=run_memo(run.stages / "digests.json"))
        _echo_plan(recipe, recipe_path, run, stages, echo)
        holder = RunLock(run.root).holder()
        if holder:
            echo(f"  (in use by pid {holder}: a run now would be refused)")
        return _summary(recipe, run, stages)
    with RunLock(run.root):
        _remove_leftovers(run)
        memo = run_memo(run.stages / "digests.json")
        stages = plan(recipe, run, start, stop, release, force_cpu, memo=memo)
        _echo_plan(recipe, recipe_path, run, stages, echo)
        for st in stages:
            if st.action == "run" and st.error:
                raise ConvertError(f"{st.name}: {st.error}")
        summary = _summary(recipe, run, stages)
        (run.root / "recipe.yaml").write_text(Path(recipe_path).read_text())
        try:
            for i, name in enumerate(STAGES):
                # re-planned with what the stages before it actually wrote
                st = plan(recipe, run, start, stop, release, force_cpu, memo=memo)[i]
                if st.action != stages[i].action or st.reason != stages[i].reason:
                    echo(f"  {name:<9} now: {st.line}")
                summary["stages"][name], summary["why"][name] = st.action, st.reason
                if st.action != "run":
                    continue
                run.unmark(name)
                echo(f"== {name} ({st.reason})")
                info = STAGE_TABLE[name].run(recipe, run, release=release, force_cpu=force_cpu, echo=echo) or {}
                run.mark(name, st.fingerprint, record=RECORD_VERSION, version=dprope.__version__, inputs=st.inputs,
                         outputs=outputs_of(name, run, st.model, memo), **info)
                summary[name] = info
            plan(recipe, run, start, stop, release, force_cpu, memo=memo)  # the model the finished stages used
        finally:
            memo.save()
        summary["model_dir"] = str(run.model_dir(recipe))
    return summary


def _remove_leftovers(run: RunDir) -> None:
    """Temporary files and folders a killed run left (atomic_dir's .NAME.partial-PID and .NAME.old-PID, partial
    records, GGUFs and Modelfiles half-written in export/): under the lock none of them can belong to a live run.
    Trainer checkpoints (.trained.work) stay, so training resumes."""
    for d in (run.root, run.stages, run.export):
        if not d.is_dir():
            continue
        for p in d.iterdir():
            if p.name.startswith(".") and (".partial" in p.name or ".old-" in p.name):
                log.info("removing %s, left by an interrupted run", p)
                if p.is_dir() and not p.is_symlink():
                    shutil.rmtree(p, ignore_errors=True)
                else:
                    p.unlink(missing_ok=True)


def _echo_plan(recipe, recipe_path, run: RunDir, stages: list[StagePlan], echo) -> None:
    echo(f"recipe {recipe.name}: {recipe_path} -> {run.root}")
    for st in stages:
        echo(f"  {st.name:<9} {st.line}")


def _summary(recipe, run: RunDir, stages: list[StagePlan]) -> dict:
    return {"recipe": recipe.name, "run_dir": str(run.root), "stages": {s.name: s.action for s in stages},
            "why": {s.name: s.reason for s in stages}}


# ------------------------------------------------------------------------------------------- stages
def _open(recipe: Recipe, given: str):
    """The source as the recipe uses it: a GGUF extended in place is never dequantised."""
    from convert.formats.checkpoint import gguf_source, open_source

    return gguf_source(Path(given), given) if recipe.export.in_place else open_source(given)


def _stage_source(recipe: Recipe, run: RunDir, **_) -> dict:
    given = resolve_source(recipe.source)
    try:
        src = _open(recipe, given)
    except ConvertError as e:
        hint = f"\n{recipe.source_hint}" if recipe.source_hint else ""
        raise ConvertError(f"{e}{hint}") from None
    return {"source": given, "hf_dir": str(src.path), "kind": src.kind, "arch": src.spec.arch.hf_class,
            "original_length": src.spec.original_length}


def _source(recipe: Recipe, run: RunDir):
    info = run.done("source")
    return _open(recipe, info["source"] if info else resolve_source(recipe.source))


def _plan_of(recipe: Recipe):
    from convert.stages.bake import make_plan

    a = recipe.method.plan_args()
    return make_plan(a.pop("method"), recipe.target_length, original_length=recipe.original_length, **a)


def _stage_factors(recipe: Recipe, run: RunDir, **_) -> dict:
    from convert.stages.bake import compute

    from convert.stages.search import is_search, run_search

    src = _source(recipe, run)
    plan = _plan_of(recipe)
    if is_search(plan.method):  # measures the model; its state in <run>/search/ lets an interrupted run resume
        result = run_search(src, plan, run.root / RUN_SEARCH)
    else:
        result = compute(src.spec, plan, src)
    run.root.mkdir(parents=True, exist_ok=True)
    (run.root / RUN_FACTORS).write_text(json.dumps(result.to_dict(), indent=1))
    return {"counts": result.counts(), "disturbance": result.disturbance}


def _stage_bake(recipe: Recipe, run: RunDir, **_) -> dict:
    from convert.stages.bake import bake

    result = dprope.DPRoPEResult.from_dict(json.loads((run.root / RUN_FACTORS).read_text()))
    bake(_source(recipe, run), run.hf, _plan_of(recipe), force=True, plot=True, result=result)
    return {"hf": str(run.hf)}


def _stage_train(recipe: Recipe, run: RunDir, force_cpu: bool = False, **_) -> dict:
    from convert.stages.train import train_from_recipe

    return train_from_recipe(recipe, run.hf, run.trained, force_cpu=force_cpu)


def _stage_validate(recipe: Recipe, run: RunDir, release: bool = False, echo=print, **_) -> dict:
    """Validate each output of ``validate.outputs``: hf/ (or trained/) in transformers into validation/, each exported
    GGUF in llama.cpp into validation/<type>/, every one beside the base model.  The base runs in the output's
    runtime where it can: a GGUF source in llama.cpp next to a GGUF, dequantised into transformers next to the
    checkpoint; a HF source in transformers."""
    from convert.card import validation_section
    from convert.stages.validate import validate

    v = recipe.validate_.resolved(release)
    src = _source(recipe, run)
    base = src.gguf_path or src.path
    model = run.model_dir(recipe)
    ggufs = dict(validated_ggufs(recipe, run, release))
    if run.validation.is_dir():  # reports of outputs no longer validated
        for d in run.validation.iterdir():
            if d.is_dir() and d.name not in ggufs:
                shutil.rmtree(d)
    command = f"dprope run {recipe.name}{' --release' if release else ''}"
    sections, failed, reports = [], [], {}
    for form in v.outputs:
        if form == "hf":
            ckpt, out = model, run.validation
        else:
            ckpt, out = ggufs[form], run.validation / form
            if not ckpt.is_file():
                raise ConvertError(f"validate.outputs lists {form} but {ckpt} is missing; the export stage writes it "
                                   "(dprope run --from export)")
        res = validate(ckpt, base, v.lengths, v.tasks, v.limit, out, v.corpus, v.gates if release else (),
                       command=command)
        where = f"{model.name}/ in transformers" if form == "hf" else f"`{ckpt.name}` in llama.cpp"
        report = out.relative_to(run.root) / "validation.md"
        sections.append((f"{form}: {where} (`{report.parent.as_posix()}/validation.json`)", res.markdown))
        echo(f"-- validation of {form}: {where}\n{res.markdown}")
        failed += [(form, g, why) for g, why in res.failed]
        reports[form] = str(run.root / report)
    if release and failed:
        raise ConvertError("release gate(s) failed: " + "; ".join(f"[{form}] {g.text} ({why})"
                                                                   for form, g, why in failed))
    # the card of the checkpoint shows every report
    card = model / "README.md"
    if card.exists():
        from convert.io.manifest import manifest_checkpoint, manifest_problems, update_manifest_entries
        from convert.stages.validate import _link_card

        # the export hashed the card before this validation: refresh its entry if it still matched
        m = run.export / MANIFEST
        listed = m.exists() and manifest_checkpoint(m) == model.resolve() and not manifest_problems(m, {card})
        _link_card(model, validation_section(sections))
        if listed:
            update_manifest_entries(m, [card])
    return {"report": reports.get("hf") or next(iter(reports.values())), "reports": reports}


def _stage_export(recipe: Recipe, run: RunDir, **_) -> dict:
    from convert.stages.export import export_outputs

    src = _source(recipe, run)
    if recipe.export.in_place:
        from convert.stages.export import export_in_place

        result = dprope.DPRoPEResult.from_dict(json.loads((run.root / RUN_FACTORS).read_text()))
        if run.export.exists():
            shutil.rmtree(run.export)
        m = export_in_place(src.gguf_path, run.export, _plan_of(recipe), result, name=recipe.name)
        return {"gguf": [g["file"] for g in m["gguf"]]}
    base_gguf = src.gguf_path if recipe.export.base_quant and src.gguf_path else None
    if run.export.exists():
        shutil.rmtree(run.export)
    m = export_outputs(run.model_dir(recipe), run.export, recipe.export.gguf, recipe.export.rope_layout, base_gguf,
                       name=recipe.name)
    return {"gguf": [g["file"] for g in m["gguf"]]}


def _stage_verify(recipe: Recipe, run: RunDir, echo=print, **_) -> dict:
    from convert.stages.verify import verify

    if recipe.export.in_place:
        return _verify_in_place(recipe, run, echo)

    from convert.io.manifest import refresh_manifest

    # the stage fingerprints (not the manifest) say whether the export is current; once the checks pass the
    # manifest is rewritten, so it describes the final files (verify.json and the card included)
    report = verify(run.export if run.export.exists() else run.model_dir(recipe), run.model_dir(recipe),
                    manifest=False)
    echo(report.table())
    if not report.ok:
        raise ConvertError("verify failed: " + "; ".join(f"{c.name} [{c.target}]: {c.detail}"
                                                       for c in report.failed()))
    if (run.export / MANIFEST).exists():
        refresh_manifest(run.export / MANIFEST)
    return {"ok": True}


# ------------------------------------------------------------------------------------------- the stage table
def _inputs_source(ins: Inputs, model: Path) -> dict:
    return {"options": _fp(ins.recipe.source), "source": ins.source()}


def _method_fp(r: Recipe) -> str:
    return _fp([r.target_length, r.original_length, r.method.model_dump()])


def _inputs_factors(ins: Inputs, model: Path) -> dict:
    return {"options": _method_fp(ins.recipe), "source": ins.source()}


def _inputs_bake(ins: Inputs, model: Path) -> dict:
    return {"options": _method_fp(ins.recipe), "source": ins.source(),
            "factors": ins.file(ins.run.root / RUN_FACTORS)}


def _inputs_train(ins: Inputs, model: Path) -> dict:
    t = ins.recipe.train
    return {"options": _fp(t.model_dump() if t else None), "model": ins.model(ins.run.hf),
            "data": ins.path(t.data if t else None)}


def _inputs_validate(ins: Inputs, model: Path) -> dict:
    r = ins.recipe
    v = r.validate_.resolved(ins.release)
    ggufs = {form: ins.file(p) for form, p in validated_ggufs(r, ins.run, ins.release)}
    return {"options": _fp(v.model_dump(), ins.release, r.name), "model": ins.model(model), "source": ins.source(),
            "corpus": ins.path(v.corpus), "export": combine(ggufs) if ggufs else None}


def _inputs_export(ins: Inputs, model: Path) -> dict:
    r = ins.recipe
    return {"options": _fp(r.export.model_dump(), r.name), "model": ins.model(model),
            "source": ins.source() if r.export.base_quant else None}


def _inputs_verify(ins: Inputs, model: Path) -> dict:
    exp = ins.memo.tree(ins.run.export, exclude=(MANIFEST,))
    return {"options": _fp(), "model": ins.model(model), "export": combine(exp) if exp else None}


def _verify_outputs(run: RunDir, model: Path, memo: Memo) -> dict:
    f = run.root / VERIFY_FILE if model.is_file() else model / VERIFY_FILE
    return {f.relative_to(run.root).as_posix(): memo.file_digest(f)} if f.is_file() else {}


@dataclass(frozen=True)
class Stage:
    """One row of the pipeline: what it reads, what it writes, the step that runs it."""

    name: str
    reads: tuple[str, ...]  # the stages whose outputs it reads ("model": the checkpoint later stages read)
    inputs: Callable[[Inputs, Path], dict]  # content digests of what it reads now (its resume fingerprint)
    outputs: Callable[[RunDir, Path, Memo], dict]  # {path in the run dir: sha256, or None for presence only}
    run: Callable[..., dict]  # the step: (recipe, run dir, release=, force_cpu=, echo=) -> summary for its record


STAGE_TABLE: dict[str, Stage] = {s.name: s for s in (
    Stage("source", (), _inputs_source, lambda run, model, memo: {}, _stage_source),
    Stage("factors", (), _inputs_factors,
          lambda run, model, memo: {RUN_FACTORS: memo.file_digest(run.root / RUN_FACTORS)}, _stage_factors),
    Stage("bake", ("factors",), _inputs_bake,
          lambda run, model, memo: _tree(memo, run.hf, (CARD_FILE,), (VERIFY_FILE,)), _stage_bake),
    Stage("train", ("bake",), _inputs_train,
          lambda run, model, memo: _tree(memo, run.trained, (CARD_FILE,), (VERIFY_FILE,)), _stage_train),
    Stage("export", ("model",), _inputs_export,
          lambda run, model, memo: _tree(memo, run.export, (MANIFEST,)) if run.export.exists() else {},
          _stage_export),
    Stage("validate", ("model",), _inputs_validate, lambda run, model, memo: _tree(memo, run.validation),
          _stage_validate),
    Stage("verify", ("model", "export"), _inputs_verify, _verify_outputs, _stage_verify),
)}
assert tuple(STAGE_TABLE) == STAGES, "the stage table and convert.names.STAGES list the same stages in order"


def _verify_in_place(recipe: Recipe, run: RunDir, echo) -> dict:
    """verify_gguf on the GGUF extended in place, with the factors the factors stage decided; the record goes to
    <run>/verify.json."""
    from convert.formats.hf import attention_factor, hf_factors
    from convert.stages.verify import verify_gguf

    src = _source(recipe, run)
    plan = _plan_of(recipe)
    spec = plan.spec_for(src.spec)
    result = dprope.DPRoPEResult.from_dict(json.loads((run.root / RUN_FACTORS).read_text()))
    long, _ = hf_factors(spec, result, plan.short_factor)
    out = run.export / gguf_file_name(recipe.name, "in-place")
    report = verify_gguf(out, src.gguf_path, factors=[float(x) for x in long.tolist()], temperature=attention_factor(spec, result),
                         write=False)
    echo(report.table())
    write_atomic(run.root / VERIFY_FILE, json.dumps({"ok": report.ok, "gguf": out.name, "checks": [
        {"name": c.name, "target": c.target, "ok": c.ok, "detail": c.detail} for c in report.checks]}, indent=1))
    if not report.ok:
        raise ConvertError("verify failed: " + "; ".join(f"{c.name} [{c.target}]: {c.detail}"
                                                       for c in report.failed()))
    return {"ok": True}
