"""What a checkpoint says about its RoPE: architecture, base, head dim, window and effective frequencies.

Reads Hugging Face config.json (4.x ``rope_scaling`` and 5.x ``rope_parameters`` forms) and GGUF metadata.
The effective inverse frequencies include any scaling the base model already has (llama3, linear, yarn,
longrope), because DPRoPE measures the distribution the model was actually trained with.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

import dprope

from .errors import ConvertError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Arch:
    model_type: str
    hf_class: str
    gguf_arch: str


# One registry of what the pipeline handles; lookups fail listing it.
ARCHITECTURES: dict[str, Arch] = {
    a.model_type: a
    for a in (
        Arch("llama", "LlamaForCausalLM", "llama"),
        Arch("mistral", "MistralForCausalLM", "llama"),
        Arch("qwen2", "Qwen2ForCausalLM", "qwen2"),
    )
}
_BY_CLASS = {a.hf_class: a for a in ARCHITECTURES.values()}


def supported_text() -> str:
    return ", ".join(f"{a.model_type} ({a.hf_class})" for a in ARCHITECTURES.values())


def lookup_arch(model_type: str | None, architectures: list[str] | None = None) -> Arch:
    if model_type in ARCHITECTURES:
        return ARCHITECTURES[model_type]
    for c in architectures or []:
        if c in _BY_CLASS:
            return _BY_CLASS[c]
    raise ConvertError(
        f"unsupported architecture {model_type or architectures!r}: supported are {supported_text()}. "
        "Other RoPE models need a registry entry in convert/modelinfo.py"
    )


@dataclass
class RopeSpec:
    """RoPE facts of a base checkpoint.

    inv_freq: effective pre-trained inverse frequencies, float32 [head_dim/2]
    plain_inv_freq: rope_theta ** (-2i/d), float32 [head_dim/2] (what HF longrope factors are relative to)
    """

    arch: Arch
    rope_theta: float
    head_dim: int
    original_length: int
    rope_type: str
    inv_freq: torch.Tensor
    plain_inv_freq: torch.Tensor
    attention_factor: float = 1.0
    source_format: str = "hf"
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def prior_factors(self) -> torch.Tensor:
        """Factors already baked into the base (1 for plain RoPE): plain / effective."""
        return self.plain_inv_freq / self.inv_freq


def _rope_params(cfg: dict) -> dict:
    """The scaling block in either config form, with rope_theta folded in."""
    params = dict(cfg.get("rope_parameters") or {})
    legacy = cfg.get("rope_scaling") or {}
    for k, v in legacy.items():
        params.setdefault(k, v)
    if "rope_theta" not in params and "rope_theta" in cfg:
        params["rope_theta"] = cfg["rope_theta"]
    params.setdefault("rope_type", params.get("type", "default"))
    return params


def rope_spec_from_config(cfg: dict) -> RopeSpec:
    arch = lookup_arch(cfg.get("model_type"), cfg.get("architectures"))
    params = _rope_params(cfg)
    prf = params.get("partial_rotary_factor", cfg.get("partial_rotary_factor", 1.0))
    if prf not in (None, 1, 1.0):
        raise ConvertError(
            f"partial rotary embeddings (partial_rotary_factor={prf}) are not supported: DPRoPE factors here cover "
            "every head dimension"
        )
    theta = params.get("rope_theta")
    if theta is None:
        raise ConvertError("config.json has no rope_theta: this does not look like a RoPE model")
    for key in ("hidden_size", "num_attention_heads", "max_position_embeddings"):
        if key not in cfg:
            raise ConvertError(f"config.json lacks '{key}': the checkpoint's config is incomplete")
    head_dim = int(cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"])
    window = int(cfg["max_position_embeddings"])
    plain = dprope.base_inv_freq(float(theta), head_dim)
    rope_type = params["rope_type"]
    attn = 1.0
    if rope_type == "default":
        eff = plain
    elif rope_type == "linear":
        eff = plain / float(params["factor"])
    elif rope_type in ("llama3", "yarn"):
        orig = int(params.get("original_max_position_embeddings") or window / float(params["factor"]))
        ctx = dprope.RopeContext(plain, float(theta), orig, round(orig * float(params["factor"])))
        if rope_type == "llama3":
            eff = plain / dprope.llama3_factors(
                ctx, float(params.get("low_freq_factor", 1.0)), float(params.get("high_freq_factor", 4.0)))
        else:
            eff = plain / dprope.yarn_factors(
                ctx, float(params.get("beta_fast", 32.0)), float(params.get("beta_slow", 1.0)))
            attn = float(params.get("attention_factor") or 0.1 * math.log(float(params["factor"])) + 1.0)
    elif rope_type == "longrope":
        long = torch.tensor(params["long_factor"], dtype=torch.float32)
        if long.numel() != head_dim // 2:
            raise ConvertError(
                f"config long_factor has {long.numel()} values, head_dim {head_dim} needs {head_dim // 2}")
        eff = 1.0 / (long * float(theta) ** (torch.arange(0, head_dim, 2).float() / head_dim))
        attn = float(params.get("attention_factor") or 1.0)
    elif rope_type == "dynamic":
        log.warning("dynamic NTK base: using its unscaled frequencies inside the original window")
        eff = plain
    else:
        raise ConvertError(
            f"rope type '{rope_type}' is not supported as a base; supported: default, linear, llama3, yarn, "
            "longrope, dynamic"
        )
    return RopeSpec(arch, float(theta), head_dim, window, rope_type, eff.float(), plain, attn, "hf")


def read_config(path: Path) -> dict:
    cfg_path = path / "config.json" if path.is_dir() else path
    if not cfg_path.exists():
        raise ConvertError(f"{cfg_path} not found: a Hugging Face checkpoint directory needs a config.json")
    try:
        return json.loads(cfg_path.read_text())
    except json.JSONDecodeError as e:
        raise ConvertError(f"{cfg_path} is not valid JSON ({e}); restore the checkpoint's config.json") from None


def gguf_fields(path: Path) -> tuple[dict[str, Any], Any]:
    """(metadata dict, reader) of a GGUF file; the reader memory-maps and loads no tensor data."""
    from gguf import GGUFReader

    try:
        reader = GGUFReader(str(path))
    except Exception as e:  # gguf-py raises ValueError / struct.error / OSError on bad files
        raise ConvertError(f"{path} is not a readable GGUF file ({type(e).__name__}: {e})") from None
    meta = {}
    for k, f in reader.fields.items():
        if k.startswith("tokenizer.ggml.") and k.rsplit(".", 1)[-1] in ("tokens", "merges", "token_type", "scores"):
            continue  # large arrays: skip
        try:
            meta[k] = f.contents()
        except Exception:  # unusual field types are not needed here
            continue
    return meta, reader


def rope_spec_from_gguf(path: Path) -> RopeSpec:
    meta, reader = gguf_fields(path)
    garch = meta.get("general.architecture")
    arch = next((a for a in ARCHITECTURES.values() if a.gguf_arch == garch), None)
    if arch is None:
        raise ConvertError(f"GGUF architecture '{garch}' is not supported: supported are llama, qwen2")
    g = lambda k, d=None: meta.get(f"{garch}.{k}", d)  # noqa: E731
    n_head = g("attention.head_count")
    emb = g("embedding_length")
    head_dim = int(g("attention.key_length") or g("rope.dimension_count") or emb // n_head)
    n_rot = int(g("rope.dimension_count", head_dim))
    if n_rot != head_dim:
        raise ConvertError(f"partial rotary embeddings (rope.dimension_count={n_rot} < head_dim {head_dim}) are not supported")
    theta = float(g("rope.freq_base", 10000.0))
    window = int(g("context_length"))
    plain = dprope.base_inv_freq(theta, head_dim)
    eff, rope_type = plain, "default"
    tensors = {t.name: t for t in reader.tensors}
    if "rope_freqs.weight" in tensors:
        ff = torch.tensor(tensors["rope_freqs.weight"].data.copy(), dtype=torch.float32).flatten()
        eff, rope_type = plain / ff, "rope_freqs"
    elif g("rope.scaling.type") == "linear" and g("rope.scaling.factor"):
        eff, rope_type = plain / float(g("rope.scaling.factor")), "linear"
    elif g("rope.scaling.type") not in (None, "none"):
        raise ConvertError(f"GGUF rope.scaling.type '{g('rope.scaling.type')}' is not supported as a base")
    orig = g("rope.scaling.original_context_length")
    return RopeSpec(arch, theta, head_dim, window, rope_type, eff.float(), plain, 1.0, "gguf",
                    {"gguf_meta_original_context": orig})


def rope_spec(path: Path) -> RopeSpec:
    """RoPE facts of a HF directory, a config.json or a GGUF file."""
    path = Path(path)
    if not path.exists():
        raise ConvertError(f"{path} does not exist: pass a checkpoint directory, a config.json or a .gguf file")
    if path.is_file() and path.suffix == ".gguf":
        return rope_spec_from_gguf(path)
    return rope_spec_from_config(read_config(path))
