"""The Hugging Face form of an extension: factors relative to the plain base, config.json in the portable
``longrope`` form, the factors tensor file, and a temperature folded into the q/k weights.

config.json is written by hand in the 4.x form (``rope_scaling`` + top-level ``rope_theta``) that transformers 4.57
and 5.x both read: 5.x converts it (transformers/modeling_rope_utils.py), 4.57 ignores ``rope_parameters``.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

import dprope

from convert.arch import RopeSpec
from convert.errors import ConvertError
from convert.io.safetensors_io import safetensors_layout
from convert.names import FACTORS_FILE

if TYPE_CHECKING:
    import torch

    from dprope import DPRoPEResult


def attention_factor(spec: RopeSpec, result: DPRoPEResult) -> float:
    """cos/sin multiplier: the method's temperature times the base's own (1 for plain RoPE)."""
    return float(result.temperature) * spec.attention_factor


def hf_factors(spec: RopeSpec, result: DPRoPEResult, short: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(long, short) factors relative to the plain base b^(-2i/d), as HF longrope and llama.cpp expect."""
    import torch

    long = (spec.prior_factors * result.factors).float()
    short_t = long.clone() if short == "same" else spec.prior_factors.float().clone()
    n = spec.head_dim // 2
    for name, t in (("long", long), ("short", short_t)):
        if t.numel() != n or not bool(torch.isfinite(t).all()) or not bool((t > 0).all()):
            raise ConvertError(f"{name} factors must be {n} finite values > 0 (head_dim {spec.head_dim}), "
                               f"got {t.numel()}")
    return long, short_t


def longrope_config(cfg: dict, spec: RopeSpec, plan: Any, long: torch.Tensor, short: torch.Tensor,
                    attn: float) -> dict:
    """config.json in the portable longrope form: 4.x `rope_scaling` + top-level rope_theta, which transformers 4.57
    and 5.x both read (5.x converts it in transformers/modeling_rope_utils.py; 4.57 ignores `rope_parameters`)."""
    out = {k: v for k, v in cfg.items() if k not in ("rope_parameters", "rope_scaling", "dprope")}
    out["rope_theta"] = spec.rope_theta
    out["rope_scaling"] = {
        "rope_type": "longrope",
        "type": "longrope",
        "long_factor": [float(x) for x in long.tolist()],
        "short_factor": [float(x) for x in short.tolist()],
        "factor": plan.target_length / spec.original_length,
        "original_max_position_embeddings": spec.original_length,
        "attention_factor": attn,
        # vLLM and SGLang ignore attention_factor and read these (vllm/model_executor/layers/rotary_embedding/
        # phi3_long_rope_scaled_rope.py); MLX-lm's SuScaledRoPE reads long_mscale (mlx_lm/models/rope_utils.py)
        "short_mscale": attn,
        "long_mscale": attn,
    }
    out["original_max_position_embeddings"] = spec.original_length
    out["max_position_embeddings"] = plan.target_length
    out["head_dim"] = spec.head_dim
    out["dprope"] = {"method": plan.method, "options": dict(plan.options), "version": dprope.__version__,
                     "base_rope_type": spec.rope_type, "target_length": plan.target_length, "temperature": attn}
    return out


def write_safetensors(path: Path, tensors: dict, metadata: dict[str, str]) -> None:
    """A safetensors file with a byte-reproducible header (keys sorted).  safetensors' own writer keeps the
    metadata in a hash map, so its order, and the file's digest, changes from process to process; content digests
    (stage fingerprints, caches, manifests) need the same bytes for the same tensors.  Format:
    https://github.com/huggingface/safetensors#format (u64 header size, JSON header, data; header padded to 8)."""
    import numpy as np

    header: dict = {"__metadata__": {k: str(v) for k, v in sorted(metadata.items())}}
    blobs, offset = [], 0
    for name in sorted(tensors):
        a = np.ascontiguousarray(tensors[name].detach().cpu().float().numpy(), dtype="<f4")
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


def write_factors(out: Path, long: torch.Tensor, short: torch.Tensor, result: DPRoPEResult) -> None:
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


