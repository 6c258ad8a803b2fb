"""Recipe schema: one validated YAML per model and target, every error reported at once."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from convert.errors import ConvertError
from convert.formats.checkpoint import resolve_source  # noqa: F401  (imported from here too)
from convert.names import OUTTYPES, ROPE_LAYOUTS, STAGES  # noqa: F401  (STAGES: imported from here too)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _import_plugins(mods) -> None:
    """Import modules (dotted names or .py paths) that register candidates or methods."""
    import importlib
    import importlib.util

    for m in mods or []:
        try:
            if str(m).endswith(".py"):
                spec = importlib.util.spec_from_file_location(Path(m).stem, m)
                if spec is None or spec.loader is None:
                    raise ImportError(f"cannot load {m}")
                mod = importlib.util.module_from_spec(spec)
                spec.loader.exec_module(mod)
            else:
                importlib.import_module(str(m))
        except Exception as e:  # a plugin's own error, reported as a recipe problem
            raise ValueError(f"plugin {m!r} failed to import: {type(e).__name__}: {e}") from None


class Method(_Strict):
    """A registered method (``dprope methods``) and its options.  ``candidates``, ``select`` and ``bins`` are the
    options of the DPRoPE family under their usual names; ``options`` sets any other (temperature, guard, ...).
    ``plugins`` are imported first, so candidates and methods they register can be named here."""

    name: str = "dprope"
    plugins: list[str] = Field(default_factory=list)
    candidates: list[str] | None = None
    select: str | None = None
    bins: int | None = Field(None, ge=2)
    options: dict = Field(default_factory=dict)
    short_factor: Literal["same", "original"] = "same"
    # auto: the YaRN fit in the HF output where a GGUF of the arch can carry nothing else (qwen3, gemma3);
    # exact: the per-pair factors in the HF output always
    hf_form: Literal["auto", "exact"] = "auto"

    @model_validator(mode="before")
    @classmethod
    def _plugins_first(cls, data):
        if isinstance(data, dict):
            _import_plugins(data.get("plugins"))
        return data

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        from dprope.methods import available_methods

        if v.lower() not in available_methods():
            raise ValueError(f"unknown method '{v}'; registered: {', '.join(available_methods())}")
        return v.lower()

    @field_validator("select")
    @classmethod
    def _select(cls, v: str | None) -> str | None:
        from dprope.select import Selection

        if v is None:
            return v
        try:
            return str(Selection.parse(v))
        except ValueError as e:
            raise ValueError(str(e)) from None

    @field_validator("candidates")
    @classmethod
    def _cands(cls, v: list[str] | None) -> list[str] | None:
        import dprope

        if v is None:
            return v
        bad = []
        for c in v:
            try:
                dprope.get_candidate(c)
            except ValueError:
                bad.append(c)
        if bad:
            raise ValueError(f"unknown candidate(s) {bad}; registered: {', '.join(dprope.available_candidates())} "
                             "(register your own in a module listed under method.plugins)")
        if not v:
            raise ValueError("at least one candidate")
        return v

    @model_validator(mode="after")
    def _options(self):
        from convert.stages.bake import make_plan

        try:
            make_plan(self.name, 1, self.candidates, self.select, self.bins, self.short_factor, options=self.options)
        except ConvertError as e:
            raise ValueError(str(e)) from None
        return self

    def plan_args(self) -> dict:
        return dict(method=self.name, candidates=self.candidates, selection=self.select, bins=self.bins,
                    short_factor=self.short_factor, options=dict(self.options), hf_form=self.hf_form)


class Train(_Strict):
    data: str = Field(description="text file, folder of .txt, or JSONL with a 'text' field")
    seq_len: int = Field(gt=0)
    steps: int = Field(gt=0)
    global_batch: int = Field(64, gt=0)
    micro_batch: int = Field(1, gt=0)
    lr: float = Field(2e-5, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    warmup_steps: int = Field(0, ge=0)
    betas: tuple[float, float] = (0.9, 0.999)
    bf16: bool = True
    gradient_checkpointing: bool = True
    save_steps: int = Field(100, gt=0)
    eval_fraction: float = Field(0.01, gt=0, lt=0.5)
    device: Literal["auto", "cuda", "cpu"] = Field("auto", description="auto: the GPU when there is one, else the "
                                                   "stage is skipped (--force-cpu runs it); cpu: always the CPU; "
                                                   "cuda: a GPU, and an error when none is visible")
    pure_bf16: bool = Field(False, description="bf16 weights and optimizer states (one 80 GB GPU for a 7B model)")
    loss_chunk: int = Field(4096, ge=0, description="positions per output-head chunk of the loss (one process); 0: "
                            "transformers' loss over the full-vocabulary logits of every position")


Length = Annotated[int, Field(gt=0)]


def _check_tasks(v):
    from convert.evaluate.engine import supported_tasks

    if v is None:
        return v
    bad = [t for t in v if t not in supported_tasks()]
    if bad:
        raise ValueError(f"unknown task(s) {bad}; offline tasks: {', '.join(supported_tasks())}")
    return v


def _check_outputs(v):
    if v is None:
        return v
    known = ("hf", *OUTTYPES, "base-quant", "in-place")
    bad = [x for x in v if x not in known]
    if bad:
        raise ValueError(f"unknown output(s) {bad}; validate.outputs takes {', '.join(known)}")
    if not v:
        raise ValueError("validate.outputs needs at least one output (hf)")
    if len(set(v)) != len(v):
        raise ValueError(f"validate.outputs lists an output twice: {v}")
    return v


def _yaml_on(cls, data):
    if isinstance(data, dict) and True in data:  # YAML 1.1 reads a bare `on:` key as the boolean true
        raise ValueError("a key `on:` (or yes/true) is read by YAML as the boolean true; the outputs to validate are "
                         "listed as `outputs: [hf, q8_0]`")
    return data


class Release(_Strict):
    """The fuller validation of `dprope run --release` / `make release`: overrides outputs, tasks, lengths and limit
    of the validate section (unset fields keep that section's values; gates and corpus are the section's)."""

    outputs: list[str] | None = None
    tasks: list[str] | None = None
    lengths: list[Length] | None = None
    limit: int | None = Field(None, ge=1)

    _tasks = field_validator("tasks")(_check_tasks)
    _outputs = field_validator("outputs")(_check_outputs)
    _on = model_validator(mode="before")(_yaml_on)


class Validate(_Strict):
    outputs: list[str] = Field(default_factory=lambda: ["hf"], description="what is measured: hf (the checkpoint, in "
                          "transformers) and exported GGUF types (f32, f16, bf16, q8_0, base-quant), each run in "
                          "llama.cpp beside the base model in the same runtime where it can be")
    tasks: list[str] = Field(default_factory=lambda: ["passkey", "ppl"])
    lengths: list[Length] = Field(default_factory=lambda: [4096, 8192, 16384])
    limit: int | None = Field(5, ge=1)
    corpus: str | None = None
    gates: list[str] = Field(default_factory=list)
    release: Release | None = None

    _tasks = field_validator("tasks")(_check_tasks)

    _on = model_validator(mode="before")(_yaml_on)

    _outputs = field_validator("outputs")(_check_outputs)

    @field_validator("gates")
    @classmethod
    def _gates(cls, v):
        from convert.evaluate.results import Gate

        for g in v:
            try:
                Gate.parse(g)
            except ConvertError as e:
                raise ValueError(str(e)) from None
        return v

    def resolved(self, release: bool) -> "Validate":
        """The settings a run uses: with ``release``, the release section's fields over this section's."""
        if not release or self.release is None:
            return self
        return self.model_copy(update={**self.release.model_dump(exclude_unset=True), "release": None})


class Export(_Strict):
    # GGUF files, a Modelfile each and manifest.json go to export/; the HF checkpoint stays where the run wrote it
    # (hf/ or trained/), so there is no safetensors copy to switch on or off
    safetensors: bool | None = Field(None, exclude=True, description="removed: it never did anything")
    gguf: list[Literal[OUTTYPES]] = Field(default_factory=lambda: ["f16", "q8_0"])
    rope_layout: Literal[ROPE_LAYOUTS] = "freqs"
    base_quant: bool = Field(False, description="also re-emit a GGUF source with its own quantisation")
    in_place: bool = Field(False, description="a .gguf source extended in place into export/<name>-in-place.gguf: "
                           "its tensors copied as they are, nothing dequantised (no hf/, so no training and no "
                           "transformers validation; validate.outputs: [in-place])")

    @field_validator("safetensors")
    @classmethod
    def _removed(cls, v):
        if v is not None:
            raise ValueError("removed: it never did anything (the export folder holds GGUF "
                             "files; the safetensors checkpoint stays in the run's hf/ or trained/ folder); delete "
                             "the line")
        return v


class Recipe(_Strict):
    name: str
    source: str = Field(description="a path, pkg://<package>/<file> for a file shipped in a Python package, or a "
                                    "hub id already in the local cache")
    source_hint: str | None = Field(None, description="how to get the source when it is missing")
    target_length: int = Field(gt=0)
    original_length: int | None = Field(None, gt=0, description="the pre-training window, when the config's "
                                        "max_position_embeddings says more than the model was trained at")
    method: Method = Method()
    train: Train | None = None
    validate_: Validate = Field(Validate(), alias="validate")
    export: Export = Export()

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    @model_validator(mode="after")
    def _cross(self):
        errs = cross_errors(self.model_dump(by_alias=True))
        if errs:
            raise ValueError("; ".join(errs))
        return self


def cross_errors(d: dict) -> list[str]:
    """Checks across sections, on plain data, so they also run (best effort) when fields have errors."""
    errs = []
    get = lambda sec, key, default=None: (d.get(sec) or {}).get(key, default) if isinstance(d.get(sec), dict) \
        else default  # noqa: E731
    target = d.get("target_length")
    if not isinstance(target, int):
        return errs
    lengths = get("validate", "lengths", []) or []
    if isinstance(lengths, list) and any(isinstance(L, int) and L > target for L in lengths):
        errs.append(f"validate.lengths {lengths} go past target_length {target}")
    release = get("validate", "release")
    rlengths = release.get("lengths") if isinstance(release, dict) else None
    if isinstance(rlengths, list) and any(isinstance(L, int) and L > target for L in rlengths):
        errs.append(f"validate.release.lengths {rlengths} go past target_length {target}")
    seq = get("train", "seq_len")
    if isinstance(seq, int) and seq > target:
        errs.append(f"train.seq_len {seq} is above target_length {target}")
    gb, mb = get("train", "global_batch", 64), get("train", "micro_batch", 1)
    if d.get("train") and isinstance(gb, int) and isinstance(mb, int) and mb > 0 and gb % mb:
        errs.append("train.global_batch must be a multiple of train.micro_batch")
    gguf = get("export", "gguf", ["f16", "q8_0"])
    for where, on in (("validate.outputs", get("validate", "outputs", ["hf"])),
                      ("validate.release.outputs", release.get("outputs") if isinstance(release, dict) else None)):
        if not isinstance(on, list) or not isinstance(gguf, list):
            continue
        missing = [x for x in on if isinstance(x, str) and x in OUTTYPES and x not in gguf]
        it = "it" if len(missing) == 1 else "them"
        if missing:
            errs.append(f"{where} lists {missing} but export.gguf does not write {it} ({gguf}); add {it} to "
                        "export.gguf")
        if "base-quant" in on and not get("export", "base_quant", False):
            errs.append(f"{where} lists base-quant but export.base_quant is off")
    if get("export", "in_place", False):
        src = d.get("source")
        if isinstance(src, str) and not src.endswith(".gguf"):
            errs.append(f"export.in_place extends a .gguf source; source {src} is not one")
        if d.get("train"):
            errs.append("export.in_place writes no hf/ checkpoint to train: drop the train section, or in_place")
        if gguf:
            errs.append(f"export.in_place keeps the source's own tensors: export.gguf must be [] (got {gguf})")
        if get("export", "base_quant", False):
            errs.append("export.in_place already keeps the source's quantisation: drop export.base_quant")
        for where, on in (("validate.outputs", get("validate", "outputs", ["hf"])),
                          ("validate.release.outputs", release.get("outputs") if isinstance(release, dict) else None)):
            if isinstance(on, list) and [x for x in on if x != "in-place"]:
                errs.append(f"{where} {on}: with export.in_place only the in-place GGUF can be validated "
                            "(outputs: [in-place])")
    else:
        for where, on in (("validate.outputs", get("validate", "outputs", ["hf"])),
                          ("validate.release.outputs", release.get("outputs") if isinstance(release, dict) else None)):
            if isinstance(on, list) and "in-place" in on:
                errs.append(f"{where} lists in-place but export.in_place is off")
    orig = d.get("original_length")
    if isinstance(orig, int) and orig >= target:
        errs.append(f"original_length {orig} is not below target_length {target}")
    errs += gate_errors(d)
    return errs


def _source_window(source) -> tuple[int | None, bool]:
    """(the base's window, whether it is known): read from the source when it is on this machine (a GGUF's
    context_length, a HF directory's max_position_embeddings: what the validate stage splits buckets at)."""
    if not isinstance(source, str):
        return None, False
    try:
        path = Path(resolve_source(source))
    except ConvertError:
        return None, False
    if not path.exists():
        return None, False
    from convert.stages.validate import base_window

    w = base_window(path)
    return w, w is not None


def gate_errors(d: dict) -> list[str]:
    """The gates checked against the run that applies them (release runs: validate.release's tasks, lengths and
    limit over validate's): each must name a task, length or perplexity bucket that run makes
    (:func:`convert.evaluate.results.gate_problems`), and an accuracy gate must be passable with the samples it
    scores (:func:`convert.evaluate.results.gate_sample_problems`).  Best effort on plain data: malformed fields are
    reported by their own checks."""
    from convert.evaluate.results import Gate, gate_problems, gate_sample_problems

    v = d.get("validate") if isinstance(d.get("validate"), dict) else {}
    gates = v.get("gates")
    if not gates or not isinstance(gates, list):
        return []
    try:
        parsed = [Gate.parse(g) for g in gates]
    except (ConvertError, TypeError):
        return []  # validate.gates reports it
    rel = v.get("release") if isinstance(v.get("release"), dict) else {}
    tasks = rel.get("tasks") or v.get("tasks") or list(Validate.model_fields["tasks"].default_factory())
    lengths = rel.get("lengths") or v.get("lengths") or list(Validate.model_fields["lengths"].default_factory())
    limit = rel["limit"] if "limit" in rel else v.get("limit", Validate.model_fields["limit"].default)
    if not (isinstance(tasks, list) and all(isinstance(t, str) for t in tasks) and isinstance(lengths, list)
            and all(isinstance(L, int) and L > 0 for L in lengths) and (limit is None or isinstance(limit, int))):
        return []
    where = "release runs, with validate.release's settings" if rel else "release runs"
    window, known = _source_window(d.get("source"))
    return [f"validate.gates (applied in {where}): {p}"
            for p in gate_problems(parsed, tasks, lengths, window, known) + gate_sample_problems(parsed, tasks, limit)]


def load_recipe(path: Path, overrides: dict | None = None) -> Recipe:
    path = Path(path)
    if not path.exists():
        raise ConvertError(f"recipe {path} does not exist; recipes live in recipes/<family>/<size>_<target>.yaml")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConvertError(f"recipe {path} is not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConvertError(f"recipe {path} must be a mapping of keys to values")
    data = {**data, **(overrides or {})}
    try:
        return Recipe.model_validate(data)
    except ValidationError as e:
        lines = []
        for err in e.errors():
            loc = ".".join(str(x) for x in err["loc"]) or "(recipe)"
            msg = err["msg"].removeprefix("Value error, ")
            lines.append(f"  - {loc}: {msg}")
        if not any(err["loc"] == () for err in e.errors()):  # field errors stop the model check: run it here
            lines += [f"  - (recipe): {m}" for m in cross_errors(data)]
        raise ConvertError(f"recipe {path} has {len(lines)} error(s):\n" + "\n".join(lines)) from None
