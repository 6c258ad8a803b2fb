"""`dprope verify`: prove every output runs with the baked factors, in every runtime we emit for.

Checks, each named so a failure says which:
  hf-inv-freq     transformers reloads the directory and its rotary inv_freq equals plain / long factors at a
                  position past the original window (and the scaling is not a no-op);
  gguf-metadata   every GGUF's context_length, freq_base, dimension_count, original context and scaling type agree
                  with the HF config;
  gguf-factors    the factor tensor(s): name, F32, shape and values equal the HF long (and short) factors;
  temperature-config  config.json carries the method's attention temperature as attention_factor and as the
                  short_mscale / long_mscale keys vLLM and SGLang read;
  hf-temperature  transformers scales cos/sin by that temperature after reloading;
                  (gguf-metadata also checks rope.scaling.attn_factor against it)
  gguf-context    the context llama.cpp allocates equals the target (no silent cap);
  parity          the same token ids through transformers and llama.cpp, at positions inside and past the original
                  window: max |dlogit| for f32/f16 and mean KL of next-token distributions for every type;
  mlx-parity      (when mlx-lm imports) the rotary module MLX-lm builds from the portable copy (or the HF directory
                  when there is none) against the factors and temperature, then the same token ids through MLX and
                  transformers (`convert.runtimes.mlx`); reported as skipped without mlx-lm.
                    manifest        when the outputs have a manifest.json: every file it lists (checkpoint files incl. README.md
                  and verify.json, GGUFs, Modelfiles) exists and has the listed sha256.  It is checked before
                  verify.json and the card are rewritten, and their entries are refreshed after (when it passed).
A negative control (the same parity numbers against the model with plain RoPE) is reported next to them.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from convert.errors import ConvertError
from convert.io.manifest import manifest_checkpoint, manifest_entries, manifest_problems, update_manifest_entries
from convert.names import MANIFEST
from convert.names import VERIFY_FILE  # noqa: F401

log = logging.getLogger(__name__)

N_TOKENS = 64
# max |dlogit| limits where they are meaningful (float weights), mean-KL limits for every type (nats).
# f32: only summation order differs (~1e-5 seen); f16/bf16/q8_0: weight rounding; base-quant: the base's own
# quantisation (k-quants and 4-bit types quantise activations too in llama.cpp).
MAX_ABS = {"f32": 1e-3, "f16": 0.5}
MAX_KL = {"f32": 1e-6, "f16": 1e-3, "bf16": 1e-2, "q8_0": 2e-2, "base-quant": 0.1}


@dataclass
class Check:
    name: str
    target: str
    ok: bool
    detail: str
    numbers: dict = field(default_factory=dict)


@dataclass
class Report:
    checks: list[Check] = field(default_factory=list)

    def add(self, name, target, ok, detail, **numbers) -> Check:
        c = Check(name, str(target), bool(ok), detail, numbers)
        self.checks.append(c)
        (log.info if ok else log.error)("%s %s [%s]: %s", "ok" if ok else "FAILED", name, target, detail)
        return c

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.checks)

    def failed(self) -> list[Check]:
        return [c for c in self.checks if not c.ok]

    def table(self) -> str:
        lines = ["| check | output | result | detail |", "|---|---|---|---|"]
        for c in self.checks:
            result = "skip" if c.numbers.get("skipped") else "pass" if c.ok else "FAIL"
            lines.append(f"| {c.name} | {c.target} | {result} | {c.detail} |")
        return "\n".join(lines)


@dataclass
class Outputs:
    checkpoint: Path
    ggufs: list[tuple[Path, str]]  # (file, type)
    portable: Path | None = None  # the copy for runtimes that apply their own temperature (convert.formats.portable)
    lone_gguf: bool = False  # one .gguf given: the HF directory is only its reference
    manifest: Path | None = None  # the manifest.json describing these outputs, when there is one
    manifest_only: set[Path] | None = None  # check just these of its files (a lone GGUF)


def find_outputs(path: Path, checkpoint: Path | None = None) -> Outputs:
    """A run directory (hf/ + export/), an export directory (manifest.json), a checkpoint directory (GGUFs inside
    or none), or one .gguf with --checkpoint."""
    path = Path(path)
    if not path.exists():
        raise ConvertError(f"{path} does not exist")
    if path.is_file():
        if path.suffix != ".gguf":
            raise ConvertError(f"{path} is not a .gguf file or an output directory")
        if checkpoint is None:
            raise ConvertError(f"verifying {path.name} alone needs --checkpoint, the HF directory it was exported from")
        m = path.parent / MANIFEST
        listed = m.exists() and path.name in {g["file"] for g in json.loads(m.read_text()).get("gguf", [])}
        only = {path}
        if listed and manifest_checkpoint(m) == Path(checkpoint).resolve():  # and the files verify rewrites there
            only |= {Path(checkpoint) / VERIFY_FILE, Path(checkpoint) / "README.md"}
        return Outputs(Path(checkpoint), [(path, _gguf_type(path))], lone_gguf=True, manifest=m if listed else None,
                       manifest_only=only)
    if (path / "hf" / "config.json").exists():  # a run directory: the checkpoint its export was made from
        exp = path / "export"
        m = exp / MANIFEST
        ck = Path(checkpoint) if checkpoint else manifest_checkpoint(m) if m.exists() else path / "hf"
        return Outputs(ck, _ggufs_in(exp) if exp.exists() else [], _portable_in(exp),
                       manifest=m if m.exists() else None)
    if (path / MANIFEST).exists():
        m = json.loads((path / MANIFEST).read_text())
        ck = Path(checkpoint) if checkpoint else (path / m["checkpoint"]["path"]).resolve()
        return Outputs(ck, [(path / g["file"], g["type"]) for g in m["gguf"]], _portable_in(path),
                       manifest=path / MANIFEST)
    if (path / "config.json").exists():
        return Outputs(path, _ggufs_in(path))
    raise ConvertError(f"{path} has no config.json, hf/ or manifest.json: not an output of this tool")


def _ggufs_in(d: Path) -> list[tuple[Path, str]]:
    m = d / "manifest.json"
    if m.exists():
        return [(d / g["file"], g["type"]) for g in json.loads(m.read_text())["gguf"]]
    return [(p, _gguf_type(p)) for p in sorted(d.glob("*.gguf"))]


def _portable_in(d: Path) -> Path | None:
    m = d / "manifest.json"
    entry = json.loads(m.read_text()).get("portable") if m.exists() else None
    return d / entry["path"] if entry else None


def _gguf_type(p: Path) -> str:
    from convert.arch import gguf_fields

    _, reader = gguf_fields(p)
    types = {t.type_name.lower() for t in reader.tensors if len(t.shape) > 1}
    for t in ("q8_0", "bf16", "f16", "f32"):
        if types == {t} or (t == "q8_0" and types <= {"q8_0", "f16"} and "q8_0" in types):
            return t
    return "base-quant"


def _torch_inv_freq(theta: float, head_dim: int):
    """Plain RoPE frequencies as transformers computes them, with torch's own float32 pow (NumPy's may differ by an
    ulp; verify compares against what the runtime really holds)."""
    import torch

    return (1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))).numpy()


def _expected(ckpt: Path) -> dict:
    """The truth to compare against: the baked factors file, the config's lengths."""
    from safetensors.numpy import load_file

    from convert.arch import head_dim_of, read_config, rope_params

    cfg = read_config(ckpt)
    p = rope_params(cfg)
    fpath = ckpt / "rope_factors.safetensors"
    if not fpath.exists():
        raise ConvertError(f"{ckpt} has no rope_factors.safetensors: not a checkpoint baked by `dprope extend`")
    f = load_file(str(fpath))
    head_dim = head_dim_of(cfg)
    theta = float(p["rope_theta"])
    plain = _torch_inv_freq(theta, head_dim)
    own = cfg.get("dprope") or {}
    if own.get("rope_form") == "yarn-fit":  # YaRN's original_max_position_embeddings is a fitted parameter
        orig = int(own["original_length"])
    else:
        orig = int(p.get("original_max_position_embeddings") or cfg.get("original_max_position_embeddings")
                   or f.get("original_length", [0])[0])
    # the temperature config.json states: the bake's (method x base), or what is left of it after folding some or
    # all into the q/k weights (dprope.temperature is always the config's part)
    temp = float(own["temperature"]) if "temperature" in own else \
        1.0 if own.get("temperature_folded") else float(p.get("attention_factor") or 1.0)
    return dict(cfg=cfg, head_dim=head_dim, theta=theta, plain=plain, long=f["long_factor"], short=f["short_factor"],
                target=int(cfg["max_position_embeddings"]), original=orig, temperature=temp, params=p)


def check_temperature_config(ckpt: Path, exp: dict, report: Report) -> None:
    """config.json states the temperature as attention_factor (what transformers reads) and carries no key a runtime
    warns about: short_mscale / long_mscale make transformers 5.x log "Unrecognized keys" on every load, and the
    runtimes that would read them (vLLM, SGLang) compute the same default without them (the portable copy carries
    any other temperature)."""
    from convert.arch import config_temperature

    p, t = exp["params"], exp["temperature"]
    problems = []
    v = config_temperature(exp["cfg"])  # attention_factor, else the default transformers computes (Phi-3's form)
    if not math.isclose(float(v), t, rel_tol=1e-6, abs_tol=1e-9):
        problems.append(f"config.json gives cos/sin scale {v:.6g} (attention_factor or its default) != temperature "
                        f"{t:.6g}")
    for key in ("short_mscale", "long_mscale"):
        if key in p:
            problems.append(f"rope_scaling.{key} present: transformers 5.x warns on it at every load")
    report.add("temperature-config", ckpt.name, not problems, "; ".join(problems) or
               f"cos/sin scale {t:.6g}, no key a runtime warns about")


def check_hf(ckpt: Path, exp: dict, report: Report):
    """Reload with the installed transformers; returns the loaded model for the parity checks."""
    import torch

    from convert.runtimes.hf import load_hf

    model = load_hf(ckpt)
    rot = getattr(getattr(model, "model", model), "rotary_emb", None)
    if rot is None:
        report.add("hf-inv-freq", ckpt.name, False, "no rotary_emb module found on the loaded model")
        return model
    with torch.no_grad():  # one token past the window makes longrope switch to the long factors
        model(torch.zeros(1, 1, dtype=torch.long), position_ids=torch.tensor([[exp["original"]]]))
    from convert.compat import rotary_table

    inv, scaling = rotary_table(rot)
    got = inv.float().numpy()
    if "sliding_attention" in (getattr(rot, "layer_types", None) or ()):
        _check_sliding(ckpt, exp, rot, report)
    report.add("hf-temperature", ckpt.name, math.isclose(scaling, exp["temperature"], rel_tol=1e-6, abs_tol=1e-9),
               f"transformers scales cos/sin by {scaling:.6g} (expected {exp['temperature']:.6g})")
    want = exp["plain"] / exp["long"]
    no_op = bool(np.allclose(exp["long"], 1.0))
    close = got.shape == want.shape and bool(np.allclose(got, want, rtol=1e-6, atol=0))
    applied = not np.allclose(got, exp["plain"], rtol=1e-6, atol=0)
    ok = close and applied and not no_op
    detail = ("inv_freq = plain / long factors" if ok else
              "the factors are all 1: scaling is a no-op" if no_op else
              "transformers ignores the scaling: inv_freq is plain RoPE (check rope_scaling in config.json)"
              if not applied else
              f"inv_freq differs from plain / factors (max rel {np.max(np.abs(got / want - 1)):.3g})")
    import transformers

    report.add("hf-inv-freq", f"{ckpt.name} (transformers {transformers.__version__})", ok, detail)
    return model


def _check_sliding(ckpt: Path, exp: dict, rot, report: Report) -> None:
    """Gemma 3's sliding-window layers keep their own base and no scaling (only the global layers are extended)."""
    from convert.compat import rotary_table

    inv, scaling = rotary_table(rot, "sliding_attention")
    local = float(exp["cfg"].get("rope_local_base_freq") or 10000.0)
    want = _torch_inv_freq(local, exp["head_dim"])
    ok = bool(np.allclose(inv.float().numpy(), want, rtol=1e-6, atol=0)) and math.isclose(scaling, 1.0)
    report.add("hf-sliding-layers", ckpt.name, ok, f"sliding layers: base {local:g}, scale {scaling:.6g}" if ok else
               f"sliding layers changed: inv_freq max rel {np.max(np.abs(inv.float().numpy() / want - 1)):.3g}, "
               f"scale {scaling:.6g} (want base {local:g}, scale 1)")


def check_gguf_meta(path: Path, exp: dict, report: Report) -> str | None:
    """Metadata and factor tensors; returns the layout found ("freqs", "longrope" or None)."""
    from convert.arch import gguf_fields

    meta, reader = gguf_fields(path)
    arch = meta.get("general.architecture")
    g = lambda k: meta.get(f"{arch}.{k}")  # noqa: E731
    problems = []
    if g("context_length") != exp["target"]:
        problems.append(f"context_length {g('context_length')} != target {exp['target']}")
    if g("rope.freq_base") is None or not np.isclose(float(g("rope.freq_base")), exp["theta"], rtol=1e-6):
        problems.append(f"rope.freq_base {g('rope.freq_base')} != {exp['theta']:g}")
    if g("rope.dimension_count") != exp["head_dim"]:
        problems.append(f"rope.dimension_count {g('rope.dimension_count')} != head_dim {exp['head_dim']}")
    if g("rope.scaling.original_context_length") != exp["original"]:
        problems.append(f"rope.scaling.original_context_length {g('rope.scaling.original_context_length')} != "
                        f"{exp['original']}")
    if g("rope.scaling.factor") is not None:
        problems.append("rope.scaling.factor is set next to factor tensors: llama.cpp would scale twice")
    attn = float(g("rope.scaling.attn_factor") if g("rope.scaling.attn_factor") is not None else 1.0)
    if not math.isclose(attn, exp["temperature"], rel_tol=1e-6, abs_tol=1e-7):
        problems.append(f"rope.scaling.attn_factor {attn:.6g} != temperature {exp['temperature']:.6g}"
                        + (" (key missing: llama.cpp would run without the temperature)"
                           if g("rope.scaling.attn_factor") is None else ""))
    tensors = {t.name: t for t in reader.tensors}
    layout = "longrope" if "rope_factors_long.weight" in tensors else "freqs" if "rope_freqs.weight" in tensors \
        else None
    stype = g("rope.scaling.type")
    if layout == "longrope" and stype != "longrope":
        problems.append(f"rope.scaling.type is {stype!r}, long/short factor tensors need 'longrope'")
    if layout == "freqs" and stype not in (None, "none"):
        problems.append(f"rope.scaling.type is {stype!r} next to rope_freqs.weight")
    report.add("gguf-metadata", path.name, not problems, "; ".join(problems) or
               f"context {exp['target']}, base {exp['theta']:g}, dims {exp['head_dim']}, original {exp['original']}")
    fproblems = []
    wanted = {"freqs": {"rope_freqs.weight": exp["long"]},
              "longrope": {"rope_factors_long.weight": exp["long"], "rope_factors_short.weight": exp["short"]}}
    if layout is None:
        fproblems.append("no factor tensor (rope_freqs.weight or rope_factors_long/short.weight): llama.cpp would "
                         "run plain RoPE")
    else:
        for name, want in wanted[layout].items():
            t = tensors.get(name)
            if t is None:
                fproblems.append(f"{name} missing")
                continue
            if t.type_name != "F32":
                fproblems.append(f"{name} is {t.type_name}, llama.cpp needs F32")
                continue
            data = np.asarray(t.data, dtype=np.float32).ravel()
            if data.shape != want.shape:
                fproblems.append(f"{name} has shape {list(data.shape)}, expected [{want.size}]")
            elif not np.array_equal(data, want.astype(np.float32)):
                fproblems.append(f"{name} values differ from the HF factors (max |d| "
                                 f"{np.abs(data - want).max():.3g})")
        if layout == "freqs" and not np.array_equal(exp["short"], exp["long"]):
            fproblems.append("rope_freqs applies the long factors at every length but the HF checkpoint uses "
                             "different short factors inside the original window; export with --rope-layout longrope")
    report.add("gguf-factors", path.name, not fproblems, "; ".join(fproblems) or f"{layout} factors equal HF's")
    return layout


FULL_SEQUENCE_MAX = 2048  # up to this many tokens, "past" is one sequence from 0 across the original window


def _parity_windows(exp: dict, n: int) -> list[tuple[str, int, int]]:
    """(name, first position, n tokens).  "past" is a full sequence crossing the original window when that is cheap
    (attention then spans more than the original length); for long windows it is n tokens placed past it."""
    if exp["original"] + n <= FULL_SEQUENCE_MAX:
        return [("inside", 0, n), ("past", 0, min(exp["target"], exp["original"] + n))]
    start = min(max(exp["original"], (exp["original"] + exp["target"]) // 2 - n // 2), exp["target"] - n)
    return [("inside", 0, n), ("past", start, n)]


def _window_ids(exp: dict, length: int) -> list[int]:
    return np.random.default_rng(0).integers(0, int(exp["cfg"]["vocab_size"]), length).tolist()


def check_parity(path: Path, gtype: str, layout: str | None, exp: dict, model, report: Report,
                 ref_cache: dict, n: int = N_TOKENS) -> dict:
    from convert.runtimes.base import max_abs_diff, mean_kl, open_runtime
    from convert.runtimes.hf import TransformersRuntime

    ref_rt = TransformersRuntime.wrap(model)

    out = {}
    problems = []
    for where, start, length in _parity_windows(exp, n):
        ids = _window_ids(exp, length)
        if where not in ref_cache:
            ref_cache[where] = ref_rt.logits(ids, start)
        ref = ref_cache[where]
        # the long factors apply when the context exceeds the original window (longrope layout picks by n_ctx)
        n_ctx = exp["target"] if where == "past" or layout != "longrope" else max(exp["original"], length)
        with open_runtime("llama.cpp", path, n_ctx=n_ctx) as rt:
            got, allocated = rt.logits(ids, start), rt.n_ctx
        if where == "past":
            report.add("gguf-context", path.name, allocated == exp["target"],
                       f"llama.cpp allocated {allocated} tokens (target {exp['target']})", allocated=allocated)
        kl, mad = mean_kl(ref, got), max_abs_diff(ref, got)
        out[where] = {"start": start, "tokens": length, "mean_kl": kl, "max_abs_dlogit": mad}
        if kl > MAX_KL.get(gtype, MAX_KL["base-quant"]):
            problems.append(f"{where}: mean KL {kl:.3g} > {MAX_KL.get(gtype, MAX_KL['base-quant']):g}")
        if gtype in MAX_ABS and mad > MAX_ABS[gtype]:
            problems.append(f"{where}: max abs dlogit {mad:.3g} > {MAX_ABS[gtype]:g}")
    detail = "; ".join(problems) or ", ".join(
        f"{w}: KL {v['mean_kl']:.2g}" + (f", max abs dlogit {v['max_abs_dlogit']:.2g}" if gtype in MAX_ABS else "")
        for w, v in out.items())
    report.add("parity", f"{path.name} ({gtype})", not problems, detail, **out)
    return out


def negative_control(exp: dict, model, ref_cache: dict, n: int = N_TOKENS) -> dict:
    """Parity numbers of the same model with plain RoPE (factors removed) against the extended reference."""
    import torch

    from convert.compat import rotary_frequencies_replaced
    from convert.runtimes.base import max_abs_diff, mean_kl
    from convert.runtimes.hf import TransformersRuntime

    rot = model.model.rotary_emb
    plain = torch.tensor(exp["plain"])
    out = {}
    with rotary_frequencies_replaced(rot, plain):
        for where, start, length in _parity_windows(exp, n):
            ref = ref_cache[where]
            got = TransformersRuntime.wrap(model).logits(_window_ids(exp, length), start)
            out[where] = {"mean_kl": mean_kl(ref, got), "max_abs_dlogit": max_abs_diff(ref, got)}
    return out


def base_control(base: Path, exp: dict, ref_cache: dict, n: int = N_TOKENS) -> dict:
    """Parity numbers of the base model itself (a HF directory or .gguf source) against the extended reference."""
    from convert.formats.checkpoint import open_source
    from convert.runtimes.base import max_abs_diff, mean_kl, open_runtime

    out = {}
    with open_runtime("transformers", open_source(base).path) as rt:
        got_by = {where: rt.logits(_window_ids(exp, length), start)
                  for where, start, length in _parity_windows(exp, n)}
    for where, start, length in _parity_windows(exp, n):
        got = got_by[where]
        ref = ref_cache[where]
        out[where] = {"mean_kl": mean_kl(ref, got), "max_abs_dlogit": max_abs_diff(ref, got)}
    return out


def check_manifest(outs: Outputs, report: Report) -> bool:
    """Every file the manifest lists exists with its sha256 (read in full)."""
    problems = manifest_problems(outs.manifest, outs.manifest_only)
    n = len(outs.manifest_only) if outs.manifest_only is not None else len(manifest_entries(outs.manifest))
    detail = ("; ".join(problems) + ": changed since the manifest was written; re-export, or restore the files"
              if problems else f"{n} listed file(s) match their sha256")
    return report.add("manifest", outs.manifest.name, not problems, detail).ok


def verify(path: Path, checkpoint: Path | None = None, write: bool = True, base: Path | None = None,
           manifest: bool = True) -> Report:
    """Run every check on the outputs at ``path``; with ``write``, record verify.json and the card section in the
    checkpoint.  ``manifest``: check the outputs' manifest.json when there is one (the run's verify stage, which
    rewrites the manifest afterwards, passes False)."""
    outs = find_outputs(path, checkpoint)
    report = Report()
    manifest_ok = check_manifest(outs, report) if manifest and outs.manifest else False
    exp = _expected(outs.checkpoint)
    check_temperature_config(outs.checkpoint, exp, report)
    model = check_hf(outs.checkpoint, exp, report)
    ref_cache: dict = {}
    parity = {}
    for gpath, gtype in outs.ggufs:
        layout = check_gguf_meta(gpath, exp, report)
        parity[gpath.name] = check_parity(gpath, gtype, layout, exp, model, report, ref_cache)
    if not ref_cache:  # no GGUF: still give the reference numbers for the control
        from convert.runtimes.hf import TransformersRuntime

        ref_rt = TransformersRuntime.wrap(model)
        for where, start, length in _parity_windows(exp, N_TOKENS):
            ref_cache[where] = ref_rt.logits(_window_ids(exp, length), start)
    if not outs.lone_gguf:
        from convert.runtimes.mlx import check_mlx

        windows = [(w, start, _window_ids(exp, length), ref_cache[w])
                   for w, start, length in _parity_windows(exp, N_TOKENS)]
        check_mlx(outs.portable or outs.checkpoint, exp, report, windows, hf_dir=outs.checkpoint)
    control = base_control(base, exp, ref_cache) if base else negative_control(exp, model, ref_cache)
    if write:
        data = {"ok": report.ok, "checkpoint": str(Path(outs.checkpoint).resolve()), "checks": [asdict(c) for c in report.checks],
                "negative_control": {"model": str(base) if base else "extended model with plain RoPE",
                                     **control}, "thresholds": {"max_abs": MAX_ABS, "mean_kl": MAX_KL},
                "tokens_per_window": N_TOKENS}
        target_dir = outs.checkpoint
        (target_dir / VERIFY_FILE).write_text(json.dumps(data, indent=1) + "\n")
        _append_card(target_dir, report, control)
        # the manifest hashed the card and verify.json before they were rewritten: refresh those entries, unless
        # it no longer matched (a tampered file must keep failing until it is re-exported)
        if manifest_ok and manifest_checkpoint(outs.manifest) == Path(outs.checkpoint).resolve():
            update_manifest_entries(outs.manifest, [target_dir / VERIFY_FILE, target_dir / "README.md"])
    report.control = control  # type: ignore[attr-defined]
    return report


def control_text(control: dict) -> str:
    return ", ".join(f"{w}: KL {v['mean_kl']:.3g}, max abs dlogit {v['max_abs_dlogit']:.3g}"
                     for w, v in control.items() if isinstance(v, dict))


def _append_card(ckpt: Path, report: Report, control: dict) -> None:
    from convert.card import verification_section

    verification_section(ckpt, report.ok, report.table(), control_text(control))



# ------------------------------------------------------------------------------------------- a GGUF extended in place
def _tensor_bytes(path: Path) -> dict[str, tuple[str, tuple, str]]:
    """{name: (type, shape, sha256 of its bytes)} of every tensor (memory-mapped; never whole in memory)."""
    import hashlib

    import gguf

    r = gguf.GGUFReader(str(path))
    out = {}
    for t in r.tensors:
        h = hashlib.sha256()
        a = np.asarray(t.data).reshape(-1).view(np.uint8)
        for i in range(0, a.size, 1 << 24):
            h.update(a[i:i + (1 << 24)].tobytes())
        out[t.name] = (t.tensor_type.name, tuple(int(x) for x in t.shape), h.hexdigest())
    return out


def _probe(path: Path, ids: list[int], start: int, n_ctx: int, **overrides) -> np.ndarray:
    from convert.quiet import quiet_libraries
    from convert.runtimes.llamacpp import LlamaCppOptions, LlamaCppRuntime

    # llama.cpp's notes (a context past n_ctx_train, the SWA cache size) go to the log file, not the screen
    with quiet_libraries(), LlamaCppRuntime(path, n_ctx, LlamaCppOptions("f16"), **overrides) as rt:
        return rt.logits(ids, start)


def verify_gguf(out: Path, source: Path, factors: list[float] | None = None, temperature: float | None = None,
                write: bool = True) -> Report:
    """Checks of a GGUF extended in place (`dprope extend model.gguf out.gguf`) against its source:

      gguf-tensors     every tensor but the rope ones has the source's bytes, type and shape;
      gguf-metadata    context_length, the form's keys and factor tensor as llama.cpp reads them, and with
                       ``factors`` (total, relative to the plain base) the values the method intended;
      takes-effect     llama.cpp's logits past the source's window differ from the source's (negative control);
      llama-cpp-own    llama.cpp computes the same rotation by itself: a YaRN form equals the source run with the
                       same YaRN numbers as context parameters; the rope_freqs layout (factors divide the angle)
                       equals llama.cpp's own linear scaling for uniform factors s on the source.
    Writes ``<out>.verify.json`` beside the file with ``write``."""
    import json
    import tempfile

    from convert.arch import gguf_fields, rope_spec_from_gguf
    from convert.formats.gguf_extend import gguf_form, write_extended_gguf
    from convert.runtimes.base import max_abs_diff

    out, source = Path(out), Path(source)
    report = Report()
    meta, _ = gguf_fields(out)
    arch = meta["general.architecture"]
    spec = rope_spec_from_gguf(source)
    target = int(meta.get(f"{arch}.context_length") or 0)
    form = meta.get("dprope.rope_form")
    # tensors
    a, b = _tensor_bytes(source), _tensor_bytes(out)
    rope = {"rope_freqs.weight", "rope_factors_long.weight", "rope_factors_short.weight"}
    changed = sorted(n for n in set(a) | set(b) if n not in rope and a.get(n) != b.get(n))
    report.add("gguf-tensors", out.name, not changed, f"{len(b)} tensors, every one but the rope ones as the source's"
               if not changed else f"differ from the source: {', '.join(changed[:5])}")
    # metadata: what the form writes for these factors
    problems = []
    if target <= spec.original_length:
        problems.append(f"context_length {target} is not above the source's window {spec.original_length}")
    if factors is not None:
        want = gguf_form(spec, np.asarray(factors, dtype=np.float64), target, float(temperature or 1.0))
        for k, (v, _t) in want["keys"].items():
            got = meta.get(f"{arch}.{k}")
            if got is None or (isinstance(v, float) and not math.isclose(float(got), v, rel_tol=1e-6)) or \
                    (not isinstance(v, float) and got != v):
                problems.append(f"{arch}.{k} = {got!r}, want {v!r}")
        if form != want["form"]:
            problems.append(f"dprope.rope_form {form!r}, want {want['form']!r}")
        _, info = gguf_fields(out)
        tensors = {t.name: t for t in info.tensors}
        for name, arr in want["tensors"].items():
            t = tensors.get(name)
            if t is None or t.type_name != "F32" or not np.allclose(np.asarray(t.data, dtype=np.float64).ravel(),
                                                                           arr.astype(np.float64), rtol=1e-6):
                problems.append(f"{name} is not the intended factors")
    report.add("gguf-metadata", out.name, not problems, "; ".join(problems) or
               f"context_length {target}, {form} form" + (" with the intended values" if factors is not None else ""))
    # the factors take effect past the window: the source rotates otherwise
    n = 64
    start = spec.original_length + max(0, (target - spec.original_length) // 2 - n)
    n_ctx = min(target, start + n + 256)
    ids = np.random.default_rng(0).integers(100, max(101, min(int(meta.get("tokenizer.ggml.tokens#len", 32000)),
                                                               30000)), n).tolist()
    got = _probe(out, ids, start, n_ctx)
    base = _probe(source, ids, start, n_ctx)
    d = max_abs_diff(got, base)
    report.add("takes-effect", out.name, d > 1e-2, f"max |dlogit| vs the source at positions {start}..{start + n - 1}: "
               f"{d:.3g}" + ("" if d > 1e-2 else ": the extension does not change what llama.cpp computes"))
    # a control llama.cpp computes on its own
    if form == "yarn-fit":
        f, L = float(meta[f"{arch}.rope.scaling.factor"]), int(meta[f"{arch}.rope.scaling.original_context_length"])
        own = _probe(source, ids, start, n_ctx, rope_scaling_type=2, rope_freq_scale=1.0 / f, yarn_orig_ctx=L)
        d = max_abs_diff(got, own)
        report.add("llama-cpp-own", out.name, d < 1e-3, f"llama.cpp's own YaRN (factor {f:.4g}, original {L}) on the "
                   f"source: max |dlogit| {d:.3g}")
    elif form == "rope_freqs":
        s = target / spec.original_length
        with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
            ctl = Path(tmp) / "uniform.gguf"
            uni = {"form": "rope_freqs", "keys": {"context_length": (target, "UINT32")},
                   "tensors": {"rope_freqs.weight": (spec.prior_factors * s).astype(np.float32)}}
            write_extended_gguf(source, ctl, spec, uni, {"method": "pi", "target_length": target, "version": ""},
                                progress=False)
            mine = _probe(ctl, ids, start, n_ctx)
        own = _probe(source, ids, start, n_ctx, rope_freq_scale=1.0 / s)
        d = max_abs_diff(mine, own)
        report.add("llama-cpp-own", out.name, d < 1e-3, f"uniform factors {s:g} in rope_freqs.weight = llama.cpp's "
                   f"own linear scaling by {s:g}: max |dlogit| {d:.3g}")
    if write:
        p = out.with_name(out.name + ".verify.json")
        p.write_text(json.dumps({"ok": report.ok, "gguf": out.name, "source": str(source),
                                 "checks": [asdict(c) for c in report.checks]}, indent=1, default=str) + "\n")
    return report
