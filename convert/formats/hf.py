"""The Hugging Face form of an extension: factors relative to the plain base, config.json in the portable
``longrope`` form, the factors tensor file, and a temperature folded into the q/k weights.

config.json is written by hand in the 4.x form (``rope_scaling`` + top-level ``rope_theta``) that transformers 4.57
and 5.x both read: 5.x converts it (transformers/modeling_rope_utils.py), 4.57 ignores ``rope_parameters``.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

import dprope

from convert.arch import RopeSpec, longrope_default_scale
from convert.errors import ConvertError
from convert.io.safetensors_io import safetensors_layout
from convert.names import FACTORS_FILE

if TYPE_CHECKING:
    import numpy as np

    from dprope import DPRoPEResult


def attention_factor(spec: RopeSpec, result: DPRoPEResult) -> float:
    """cos/sin multiplier: the method's temperature times the base's own (1 for plain RoPE)."""
    return float(result.temperature) * spec.attention_factor


def hf_factors(spec: RopeSpec, result: DPRoPEResult, short: str) -> tuple[np.ndarray, np.ndarray]:
    """(long, short) factors relative to the plain base b^(-2i/d), as HF longrope and llama.cpp expect.  A longrope
    base (Phi-3) keeps its own short factors: they serve inside its own original window, where it was trained with
    them.  float32 NumPy [n_pairs] each."""
    import numpy as np

    from dprope.freqs import as_array

    long = (spec.prior_factors * as_array(result.factors)).astype(np.float32)
    if spec.rope_type == "longrope":
        short_t = np.array(spec.params.get("short_factor") or spec.params["long_factor"], dtype=np.float32)
    else:
        short_t = long.copy() if short == "same" else spec.prior_factors.astype(np.float32)
    n = spec.head_dim // 2
    for name, t in (("long", long), ("short", short_t)):
        if t.size != n or not bool(np.isfinite(t).all()) or not bool((t > 0).all()):
            raise ConvertError(f"{name} factors must be {n} finite values > 0 (head_dim {spec.head_dim}), "
                               f"got {t.size}")
    return long, short_t


def longrope_window(spec: RopeSpec) -> int:
    """Where long factors take over from short ones: a longrope base's own original window (Phi-3: 4096), else
    the window the model is extended from."""
    if spec.rope_type == "longrope" and spec.params.get("original_max_position_embeddings"):
        return int(spec.params["original_max_position_embeddings"])
    return int(spec.original_length)


def _base_config(cfg: dict, spec: RopeSpec, plan: Any) -> dict:
    """The source's config.json without its rope blocks, in the 4.x form both transformers 4.57 and 5.x read:
    top-level rope_theta (the scaled layers' base), and for Gemma 3 rope_local_base_freq (its sliding layers')."""
    out = {k: v for k, v in cfg.items() if k not in ("rope_parameters", "rope_scaling", "dprope")}
    out["rope_theta"] = spec.rope_theta
    if spec.arch.layers == "global":
        rp = cfg.get("rope_parameters") or {}
        local = (rp.get("sliding_attention") or {}).get("rope_theta") or cfg.get("rope_local_base_freq") or 10000.0
        out["rope_local_base_freq"] = float(local)
    out["max_position_embeddings"] = plan.target_length
    out["head_dim"] = spec.head_dim
    return out


def _provenance(spec: RopeSpec, plan: Any, attn: float, form: dict) -> dict:
    return {"method": plan.method, "options": dict(plan.options), "version": dprope.__version__,
            "base_rope_type": spec.rope_type, "original_length": spec.original_length,
            "target_length": plan.target_length, "temperature": attn, **form}


def longrope_config(cfg: dict, spec: RopeSpec, plan: Any, long: np.ndarray, short: np.ndarray,
                    attn: float) -> dict:
    """config.json in the portable longrope form: 4.x `rope_scaling` + top-level rope_theta, which transformers 4.57
    and 5.x both read (5.x converts it in transformers/modeling_rope_utils.py; 4.57 ignores `rope_parameters`).

    No short_mscale / long_mscale: transformers 5.x warns on them on every load (its longrope validation,
    modeling_rope_utils.py ``_check_received_keys``), and the runtimes that read them (vLLM, SGLang) or apply their
    own default (MLX-lm, ExLlamaV2) all compute Phi-3's sqrt(1 + ln s / ln L) without them: the default method's
    temperature is that value, and `dprope export` writes the portable copy for any other."""
    orig = longrope_window(spec)
    out = _base_config(cfg, spec, plan)
    if spec.rope_type == "longrope":
        # a longrope base (Phi-3): its own config form, which transformers 4.57's Phi3Config insists on (exactly
        # type, short_factor, long_factor: models/phi3/configuration_phi3.py _rope_scaling_validation) and 5.x reads;
        # both then scale cos/sin by Phi-3's sqrt(1 + ln(target / original) / ln original), which stands for the
        # base's own temperature at the new length and the method's
        default = longrope_default_scale(plan.target_length, orig)
        out["rope_scaling"] = {"type": "longrope", "long_factor": [float(x) for x in long.tolist()],
                               "short_factor": [float(x) for x in short.tolist()]}
        out["original_max_position_embeddings"] = orig
        out["dprope"] = _provenance(spec, plan, default, {"rope_form": "longrope", "method_temperature": attn})
        return out
    out["rope_scaling"] = {
        "rope_type": "longrope",
        "type": "longrope",
        "long_factor": [float(x) for x in long.tolist()],
        "short_factor": [float(x) for x in short.tolist()],
        "factor": plan.target_length / orig,
        "original_max_position_embeddings": orig,
        "attention_factor": attn,
    }
    out["original_max_position_embeddings"] = orig
    out["dprope"] = _provenance(spec, plan, attn, {"rope_form": "longrope"})
    return out


def fit_yarn_for(spec: RopeSpec, plan: Any, result: DPRoPEResult, long: np.ndarray):
    """The YaRN parametrisation closest to the total factors ``long`` (relative to the plain base), and the
    angle-distribution disturbance of both (:mod:`dprope`'s criterion, in nats): (fit, {exact_disturbance,
    fit_disturbance})."""
    import numpy as np

    from dprope.freqs import RopeContext, as_array
    from dprope.methods import run_method
    from dprope.yarn_fit import fit_yarn

    fit = fit_yarn(as_array(long, np.float64), spec.head_dim, spec.rope_theta, spec.original_length,
                   plan.target_length)
    rel = np.array(fit.factors, dtype=np.float32) / spec.prior_factors.astype(np.float32)
    ctx = RopeContext(spec.inv_freq, spec.rope_theta, spec.original_length, plan.target_length)
    fit_d = run_method("factors", ctx, long=[float(x) for x in rel.tolist()]).disturbance["selected"]
    return fit, {"exact_disturbance": float(result.disturbance["selected"]), "fit_disturbance": float(fit_d)}


def yarn_temperature(fit) -> float:
    """The cos/sin scale of a YaRN form: YaRN's own 1 + 0.1 ln f on the scaled layers, as llama.cpp applies it with
    attn_factor 1 (src/llama-context.cpp, ggml-cpu/ops.cpp rope_yarn), MLX-lm's YarnRoPE computes it, and
    transformers with attention_factor unset.  A method's own temperature is not carried: llama.cpp's attn_factor
    would also scale the layers YaRN leaves alone (Gemma 3's sliding ones), and MLX-lm reads no attention_factor."""
    return 1.0 + 0.1 * math.log(fit.factor)


def yarn_config(cfg: dict, spec: RopeSpec, plan: Any, fit, attn: float, exact: dict) -> dict:
    """config.json with the YaRN block ``fit`` (:func:`dprope.yarn_fit.fit_yarn`) stands for: the one form a GGUF
    of this arch can carry, so transformers and llama.cpp run the same model.  ``exact``: what the exact method's
    factors would have been (kept in the provenance block with the fit's error)."""
    hf_t = yarn_temperature(fit)
    out = _base_config(cfg, spec, plan)
    out["rope_scaling"] = {
        "rope_type": "yarn",
        "type": "yarn",
        "factor": float(fit.factor),
        "original_max_position_embeddings": int(fit.original_length),
        "attention_factor": hf_t,
        "beta_fast": 32.0,
        "beta_slow": 1.0,
    }
    out["dprope"] = _provenance(spec, plan, hf_t, {"rope_form": "yarn-fit", "yarn_fit": {
        "factor": fit.factor, "original_length": fit.original_length, "rms_log_error": fit.rms_log_error,
        "max_log_error": fit.max_log_error, "method_temperature": attn, **exact}})
    return out


HF_FORMS = ("auto", "exact")


def rope_config(cfg: dict, spec: RopeSpec, plan: Any, result: DPRoPEResult, long: np.ndarray, short: np.ndarray,
                attn: float) -> tuple[dict, np.ndarray, np.ndarray]:
    """(config.json, long, short factors it runs) of the extension in the form every output of the arch can carry
    (``plan.hf_form``): the exact per-pair factors (longrope), or, for an arch whose GGUF can carry only YaRN (qwen3,
    gemma3; convert/arch.py), the YaRN fit and its factors, unless ``hf_form`` is "exact" (then the provenance
    block records how far a GGUF will differ)."""
    import numpy as np

    if not spec.arch.hf_yarn:
        return longrope_config(cfg, spec, plan, long, short, attn), long, short
    fit, exact = fit_yarn_for(spec, plan, result, long)
    if getattr(plan, "hf_form", "auto") == "exact":
        out = longrope_config(cfg, spec, plan, long, short, attn)
        out["dprope"]["gguf_form"] = {"rope_form": "yarn-fit", "factor": fit.factor,
                                      "original_length": fit.original_length, "rms_log_error": fit.rms_log_error,
                                      "temperature": yarn_temperature(fit), **exact}
        return out, long, short
    fitted = np.array(fit.factors, dtype=np.float32)
    return yarn_config(cfg, spec, plan, fit, attn, exact), fitted, fitted.copy()


def write_safetensors(path: Path, tensors: dict, metadata: dict[str, str]) -> None:
    """A safetensors file with a byte-reproducible header (keys sorted).  safetensors' own writer keeps the
    metadata in a hash map, so its order, and the file's digest, changes from process to process; content digests
    (stage fingerprints, caches, manifests) need the same bytes for the same tensors.  Format:
    https://github.com/huggingface/safetensors#format (u64 header size, JSON header, data; header padded to 8)."""
    import numpy as np

    header: dict = {"__metadata__": {k: str(v) for k, v in sorted(metadata.items())}}
    blobs, offset = [], 0
    for name in sorted(tensors):
        t = tensors[name]
        if hasattr(t, "detach"):  # a torch tensor
            t = t.detach().cpu().float().numpy()
        a = np.ascontiguousarray(t, dtype="<f4")
        header[name] = {"dtype": "F32", "shape": list(a.shape), "data_offsets": [offset, offset + a.nbytes]}
        blobs.append(a.tobytes())
        offset += a.nbytes
    raw = json.dumps(header, separators=(",", ":"), sort_keys=True).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little"))
        f.write(raw)
        for b in blobs:
            f.write(b)


def write_factors(out: Path, long: np.ndarray, short: np.ndarray, result: DPRoPEResult) -> None:
    write_safetensors(out / FACTORS_FILE,
                      {"long_factor": long, "short_factor": short, "inv_freq": result.inv_freq,
                       "base_inv_freq": result.base_inv_freq},
                      {"method": result.params.get("method", ""),
                       "original_length": result.params["original_length"],
                       "target_length": result.params["target_length"]})


_QK = re.compile(r"\.self_attn\.[qk]_proj\.(weight|bias)$")


def fold_into_qk(directory: Path, t: float) -> list[str]:
    """Multiply every q_proj / k_proj weight and bias in the safetensors files of ``directory`` by ``t``, in place,
    one tensor at a time.  RoPE rotates q and k linearly, so scaling both by t scales every attention logit by t^2,
    exactly what a cos/sin temperature t does.  Returns the names of the tensors changed."""
    import torch

    dtypes = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
    changed = []
    for f in sorted(Path(directory).glob("*.safetensors")):
        if f.name == FACTORS_FILE:
            continue
        header, start = safetensors_layout(f)
        with open(f, "r+b") as fh:
            for name, info in header.items():
                if name == "__metadata__" or not _QK.search(name):
                    continue
                if info["dtype"] not in dtypes:
                    raise ConvertError(f"cannot fold the temperature into {name} of dtype {info['dtype']}")
                a, b = info["data_offsets"]
                fh.seek(start + a)
                x = torch.frombuffer(bytearray(fh.read(b - a)), dtype=dtypes[info["dtype"]])
                y = (x.float() * t).to(x.dtype)
                fh.seek(start + a)
                fh.write(y.view(torch.uint8).numpy().tobytes())
                changed.append(name)
    if not changed:
        raise ConvertError("--fold-temperature found no q_proj / k_proj tensors to scale (Llama, Mistral and Qwen2 "
                           "name them model.layers.N.self_attn.q_proj.weight)")
    return changed


