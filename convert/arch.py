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
from functools import cached_property
from pathlib import Path
from typing import Any

from convert.errors import ConvertError

log = logging.getLogger(__name__)


# How llama.cpp's graph for an arch applies RoPE (ggml-org/llama.cpp src/models/<arch>.cpp, 2026): whether it passes
# a per-pair factor tensor to ggml_rope_ext.  Only then can a GGUF carry per-pair factors; every arch reads the YaRN
# keys (<arch>.rope.scaling.type/factor/original_context_length/attn_factor, src/llama-model.cpp load_hparams).
GGUF_FACTORS_FREQS = "rope_freqs"  # rope_freqs.weight (F32, n_rot/2), divides the angle: arch llama and its family
GGUF_FACTORS_LONGROPE = "rope_factors"  # rope_factors_long/short.weight with rope.scaling.type longrope: arch phi3
GGUF_FACTORS_NONE = None  # the graph passes no factor tensor (qwen2, qwen3, gemma3): a YaRN parametrisation only


@dataclass(frozen=True)
class Arch:
    """One row of the architecture table: every part of the pipeline reads these fields, none keeps its own list.

    model_types / hf_classes: what a HF config.json says (``model_type``, ``architectures``);
    gguf_arch: llama.cpp's ``general.architecture`` for this model (what its converter writes);
    decoder_layer: the HF decoder layer class (FSDP wraps one per unit);
    gguf_factors: the factor tensor llama.cpp's graph for ``gguf_arch`` reads, or None (see above);
    layers: which attention layers the model's rope scaling applies to: "all", or "global" (Gemma 3: the
        full-attention layers; sliding-window layers keep their own base and no scaling);
    export_gguf: `dprope export-gguf` can write this arch's tensors from a HF checkpoint (the llama graph: Llama,
        Mistral, and Qwen2, whose graph is llama's with q/k/v biases and so is written as arch llama);
    dpe: DPE's attention (convert/runtimes/dpe.py) runs it;
    hf_yarn: the HF output carries the YaRN fit by default (the GGUF can carry nothing else), so every runtime runs
        the model that was validated.
    """

    name: str
    model_types: tuple[str, ...]
    hf_classes: tuple[str, ...]
    gguf_arch: str
    decoder_layer: str
    gguf_factors: str | None
    layers: str = "all"
    export_gguf: bool = False
    dpe: bool = False

    @property
    def model_type(self) -> str:
        return self.model_types[0]

    @property
    def hf_class(self) -> str:
        return self.hf_classes[0]

    @property
    def hf_yarn(self) -> bool:
        """No GGUF of this arch can carry per-pair factors (llama.cpp's graph reads none and `export-gguf` cannot
        write it as another arch that does)."""
        return self.gguf_factors is None and not self.export_gguf

    def __str__(self) -> str:
        return f"{self.model_type} ({self.hf_class}; GGUF {self.gguf_arch})"


# THE architecture table; lookups fail listing it.
ARCHES: tuple[Arch, ...] = (
    Arch("llama", ("llama",), ("LlamaForCausalLM",), "llama", "LlamaDecoderLayer", GGUF_FACTORS_FREQS,
         export_gguf=True, dpe=True),
    Arch("mistral", ("mistral",), ("MistralForCausalLM",), "llama", "MistralDecoderLayer", GGUF_FACTORS_FREQS,
         export_gguf=True, dpe=True),
    Arch("qwen2", ("qwen2",), ("Qwen2ForCausalLM",), "qwen2", "Qwen2DecoderLayer", GGUF_FACTORS_NONE,
         export_gguf=True, dpe=True),
    Arch("qwen3", ("qwen3",), ("Qwen3ForCausalLM",), "qwen3", "Qwen3DecoderLayer", GGUF_FACTORS_NONE, dpe=True),
    Arch("gemma3", ("gemma3_text",), ("Gemma3ForCausalLM",), "gemma3", "Gemma3DecoderLayer", GGUF_FACTORS_NONE,
         layers="global"),
    Arch("phi3", ("phi3",), ("Phi3ForCausalLM",), "phi3", "Phi3DecoderLayer", GGUF_FACTORS_LONGROPE),
)
ARCHITECTURES: dict[str, Arch] = {t: a for a in ARCHES for t in a.model_types}  # by HF model_type
_BY_CLASS = {c: a for a in ARCHES for c in a.hf_classes}


def supported_text() -> str:
    return ", ".join(str(a) for a in ARCHES)


def lookup_arch(model_type: str | None, architectures: list[str] | None = None) -> Arch:
    if model_type in ARCHITECTURES:
        return ARCHITECTURES[model_type]
    for c in architectures or []:
        if c in _BY_CLASS:
            return _BY_CLASS[c]
    raise ConvertError(
        f"unsupported architecture {model_type or architectures!r}: supported are {supported_text()}. "
        "Other RoPE models need a row in the architecture table (convert/arch.py ARCHES)"
    )


def lookup_gguf_arch(gguf_arch: str | None) -> Arch:
    """The table's row for a GGUF's ``general.architecture`` (the first row with that name: arch llama is Llama)."""
    for a in ARCHES:
        if a.gguf_arch == gguf_arch:
            return a
    raise ConvertError(f"GGUF architecture '{gguf_arch}' is not supported: supported are "
                       f"{', '.join(sorted({a.gguf_arch for a in ARCHES}))} ({supported_text()}). Other RoPE models "
                       "need a row in the architecture table (convert/arch.py ARCHES)")


@dataclass
class RopeSpec:
    """RoPE facts of a base checkpoint, read from its config or GGUF metadata without importing torch; the
    frequency tensors are computed on first use.

    inv_freq: effective pre-trained inverse frequencies, float32 NumPy [head_dim/2]
    plain_inv_freq: rope_theta ** (-2i/d), float32 NumPy [head_dim/2] (what HF longrope factors are relative to)
    """

    arch: Arch
    rope_theta: float
    head_dim: int
    original_length: int
    rope_type: str
    params: dict[str, Any] = field(default_factory=dict)
    attention_factor: float = 1.0
    source_format: str = "hf"
    gguf_factors: list[float] | None = None  # a GGUF base's rope_freqs tensor

    @cached_property
    def plain_inv_freq(self):
        import dprope

        return dprope.base_inv_freq(self.rope_theta, self.head_dim)

    @cached_property
    def inv_freq(self):
        """Effective frequencies, including the scaling the base already has."""
        import numpy as np

        import dprope

        plain, p = self.plain_inv_freq, self.params
        if self.rope_type in ("default", "dynamic"):
            return plain
        if self.rope_type == "linear":
            return (plain / np.float32(p["factor"])).astype(np.float32)
        if self.rope_type in ("llama3", "yarn"):
            orig = int(p.get("original_max_position_embeddings") or self.original_length / float(p["factor"]))
            ctx = dprope.RopeContext(plain, self.rope_theta, orig, round(orig * float(p["factor"])))
            if self.rope_type == "llama3":
                return plain / dprope.llama3_factors(
                    ctx, float(p.get("low_freq_factor", 1.0)), float(p.get("high_freq_factor", 4.0)))
            return (plain / dprope.yarn_factors(ctx, float(p.get("beta_fast", 32.0)),
                                                float(p.get("beta_slow", 1.0)))).astype(np.float32)
        if self.rope_type == "longrope":
            return longrope_inv_freq(p["long_factor"], self.rope_theta, self.head_dim)
        if self.rope_type == "rope_freqs":
            return (plain / np.array(self.gguf_factors, dtype=np.float32)).astype(np.float32)
        raise AssertionError(self.rope_type)  # rope_spec_* only build the types above

    def with_window(self, original_length: int) -> "RopeSpec":
        """The same base with a different pre-training window (when the config overstates it)."""
        import dataclasses

        return dataclasses.replace(self, original_length=int(original_length))

    @property
    def prior_factors(self):
        """Factors already baked into the base (1 for plain RoPE): plain / effective."""
        return self.plain_inv_freq / self.inv_freq


def longrope_inv_freq(long_factor, rope_theta: float, head_dim: int):
    """Inverse frequencies, float32 [head_dim/2], of a longrope config with these long factors, computed as
    transformers computes them (modeling_rope_utils.py ``_compute_longrope_parameters``): 1 / (ext * b^(2i/d)), in
    float32 as torch evaluates it.  A NumPy array (a torch tensor of factors is read through its values)."""
    import numpy as np

    from dprope.freqs import as_array

    shape = np.arange(0, head_dim, 2, dtype=np.int64).astype(np.float32) / np.float32(head_dim)
    return (np.float32(1.0) / (as_array(long_factor) * (np.float32(rope_theta) ** shape))).astype(np.float32)


_BASE_ROPE_TYPES = ("default", "linear", "llama3", "yarn", "longrope", "dynamic")


def rope_params(cfg: dict) -> dict:
    """The scaling block in either config form, with rope_theta folded in."""
    params = dict(cfg.get("rope_parameters") or {})
    if isinstance(params.get("full_attention"), dict):  # one block per layer type (Gemma 3, transformers 5.x)
        params = dict(params["full_attention"])
    legacy = cfg.get("rope_scaling") or {}
    for k, v in legacy.items():
        params.setdefault(k, v)
    if "rope_theta" not in params and "rope_theta" in cfg:
        params["rope_theta"] = cfg["rope_theta"]
    params.setdefault("rope_type", params.get("type", "default"))
    return params


def head_dim_of(cfg: dict) -> int:
    """Per-head width of a HF config: ``head_dim`` when the config states it (Gemma, Qwen3, Mistral set it apart
    from hidden_size / heads), else hidden_size / num_attention_heads (transformers' own fallback)."""
    return int(cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"])


def rope_spec_from_config(cfg: dict) -> RopeSpec:
    arch = lookup_arch(cfg.get("model_type"), cfg.get("architectures"))
    params = rope_params(cfg)
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
    head_dim = head_dim_of(cfg)
    window = int(cfg["max_position_embeddings"])
    rope_type = params["rope_type"]
    if rope_type not in _BASE_ROPE_TYPES:
        raise ConvertError(f"rope type '{rope_type}' is not supported as a base; supported: "
                           f"{', '.join(_BASE_ROPE_TYPES)}")
    attn = 1.0
    if rope_type == "yarn":
        attn = float(params.get("attention_factor") or 0.1 * math.log(float(params["factor"])) + 1.0)
    elif rope_type == "longrope":
        if len(params.get("long_factor") or []) != head_dim // 2:
            raise ConvertError(f"config long_factor has {len(params.get('long_factor') or [])} values, "
                               f"head_dim {head_dim} needs {head_dim // 2}")
        orig = params.get("original_max_position_embeddings") or cfg.get("original_max_position_embeddings")
        # Phi-3's own temperature when the config states none (transformers' longrope default)
        attn = float(params.get("attention_factor") or (longrope_default_scale(window, int(orig)) if orig else 1.0))
    elif rope_type == "dynamic":
        log.warning("dynamic NTK base: using its unscaled frequencies inside the original window")
    return RopeSpec(arch, float(theta), head_dim, window, rope_type, params, attn, "hf")


def read_config(path: Path) -> dict:
    cfg_path = path / "config.json" if path.is_dir() else path
    if not cfg_path.exists():
        raise ConvertError(f"{cfg_path} not found: a Hugging Face checkpoint directory needs a config.json")
    try:
        return json.loads(cfg_path.read_text())
    except json.JSONDecodeError as e:
        raise ConvertError(f"{cfg_path} is not valid JSON ({e}); restore the checkpoint's config.json") from None


def gguf_fields(path: Path, info: Any = None) -> tuple[dict[str, Any], Any]:
    """(metadata dict, tensor table) of a GGUF file, from its header alone (see `ggufmeta`).  ``info``: the header
    already read (``convert.io.gguf_meta.read_gguf``), so a command walks a large vocabulary once, not per step."""
    from convert.io.gguf_meta import read_gguf

    info = info if info is not None else read_gguf(Path(path))
    return info.meta, info


# GGUF rope keys a base may carry (beyond context_length, rope.freq_base and the dimension counts); anything else
# under <arch>.rope. is refused rather than guessed at
_GGUF_ROPE_KEYS = {"rope.dimension_count", "rope.freq_base", "rope.freq_base_swa", "rope.scaling.type",
                   "rope.scaling.factor", "rope.scaling.original_context_length", "rope.scaling.attn_factor",
                   "rope.scaling.finetuned", "rope.scale_linear", "rope.dimension_count_swa"}


def _gguf_factor_tensor(tensors: dict, name: str, n: int) -> list[float]:
    t = tensors[name]
    if t.type_name != "F32":
        raise ConvertError(f"{name} is {t.type_name}; llama.cpp reads only F32 factor tensors: re-convert "
                           "the model with llama.cpp's convert_hf_to_gguf.py")
    ff = [float(x) for x in t.data.flatten().tolist()]
    if len(ff) != n:
        raise ConvertError(f"{name} has {len(ff)} values, the rotary dimension needs {n}")
    return ff


def rope_spec_from_gguf(path: Path, info: Any = None) -> RopeSpec:
    meta, reader = gguf_fields(path, info)
    garch = meta.get("general.architecture")
    arch = lookup_gguf_arch(garch)
    g = lambda k, d=None: meta.get(f"{garch}.{k}", d)  # noqa: E731
    unknown = sorted(k[len(garch) + 1:] for k in meta if k.startswith(f"{garch}.rope.")
                     and k[len(garch) + 1:] not in _GGUF_ROPE_KEYS)
    if unknown:
        raise ConvertError(f"{path.name} carries rope keys this tool does not understand ({', '.join(unknown)}): "
                           "extending it could silently change what they do. Start from the HF checkpoint, or a "
                           "GGUF converted by llama.cpp's convert_hf_to_gguf.py without them")
    n_head = g("attention.head_count")
    emb = g("embedding_length")
    head_dim = int(g("attention.key_length") or g("rope.dimension_count") or emb // n_head)
    n_rot = int(g("rope.dimension_count", head_dim))
    if n_rot != head_dim:
        raise ConvertError(f"partial rotary embeddings (rope.dimension_count={n_rot} < head_dim {head_dim}) are not supported")
    theta = float(g("rope.freq_base", 10000.0))
    if g("context_length") is None:
        raise ConvertError(f"{path.name} has no {garch}.context_length: not a complete llama.cpp GGUF")
    window = int(g("context_length"))
    tensors = {t.name: t for t in reader.tensors}
    stype = g("rope.scaling.type")
    attn = float(g("rope.scaling.attn_factor", 1.0) or 1.0)
    has = [n for n in ("rope_freqs.weight", "rope_factors_long.weight", "rope_factors_short.weight") if n in tensors]
    if has and arch.gguf_factors is None:
        raise ConvertError(f"{path.name} carries {', '.join(has)} but llama.cpp's {garch} graph reads no factor "
                           "tensor: the file does not run as its tensors say. Re-convert it with llama.cpp's "
                           "convert_hf_to_gguf.py")
    if "rope_factors_long.weight" in tensors:
        long = _gguf_factor_tensor(tensors, "rope_factors_long.weight", head_dim // 2)
        short = (_gguf_factor_tensor(tensors, "rope_factors_short.weight", head_dim // 2)
                 if "rope_factors_short.weight" in tensors else list(long))
        orig = int(g("rope.scaling.original_context_length") or window)
        params = {"long_factor": long, "short_factor": short, "original_max_position_embeddings": orig}
        return RopeSpec(arch, theta, head_dim, window, "longrope", params, attn, "gguf")
    if "rope_freqs.weight" in tensors:
        ff = _gguf_factor_tensor(tensors, "rope_freqs.weight", head_dim // 2)
        return RopeSpec(arch, theta, head_dim, window, "rope_freqs", {}, attn, "gguf", ff)
    factor = float(g("rope.scaling.factor") or g("rope.scale_linear") or 0.0)
    if stype == "linear" or (stype is None and factor > 0):
        return RopeSpec(arch, theta, head_dim, window, "linear", {"factor": factor or 1.0}, attn, "gguf")
    if stype == "yarn":
        orig = int(g("rope.scaling.original_context_length") or window / factor)
        params = {"factor": factor, "original_max_position_embeddings": orig}
        # llama.cpp's total cos/sin scale under YaRN: attn_factor x (1 + 0.1 ln factor) (src/llama-context.cpp)
        return RopeSpec(arch, theta, head_dim, window, "yarn", params, attn * (1 + 0.1 * math.log(factor)), "gguf")
    if stype not in (None, "none"):
        raise ConvertError(f"GGUF rope.scaling.type '{stype}' is not supported as a base")
    return RopeSpec(arch, theta, head_dim, window, "default", {}, attn, "gguf")


def rope_spec(path: Path, info: Any = None) -> RopeSpec:
    """RoPE facts of a HF directory, a config.json or a GGUF file (``info``: its header, already read)."""
    path = Path(path)
    if not path.exists():
        raise ConvertError(f"{path} does not exist: pass a checkpoint directory, a config.json or a .gguf file")
    if path.is_file() and path.suffix == ".gguf":
        return rope_spec_from_gguf(path, info)
    return rope_spec_from_config(read_config(path))


# ------------------------------------------------------------------------------------------- temperature
def longrope_default_scale(max_position: int, original: int) -> float:
    """Phi-3's longrope temperature, the default of transformers, vLLM, SGLang, MLX-lm and ExLlamaV2."""
    s = max_position / original
    return 1.0 if s <= 1.0 else math.sqrt(1 + math.log(s) / math.log(original))


def scaling_block(cfg: dict) -> dict:
    rs = cfg.get("rope_scaling")
    return dict(rs) if isinstance(rs, dict) else {}


def config_temperature(cfg: dict) -> float:
    """The cos/sin multiplier transformers applies for this config (attention_factor, else its default)."""
    rs = scaling_block(cfg) or dict(cfg.get("rope_parameters") or {})
    if rs.get("attention_factor") is not None:
        return float(rs["attention_factor"])
    orig = rs.get("original_max_position_embeddings") or cfg.get("original_max_position_embeddings")
    if (rs.get("rope_type") or rs.get("type")) == "longrope" and orig:
        return longrope_default_scale(int(cfg["max_position_embeddings"]), int(orig))
    if (rs.get("rope_type") or rs.get("type")) == "yarn" and rs.get("factor"):
        return 0.1 * math.log(float(rs["factor"])) + 1.0  # transformers' yarn_get_mscale
    return 1.0


def qk_fold(cfg: dict) -> float:
    """The temperature already multiplied into the q/k weights (`--fold-temperature`, the portable copy)."""
    return float((cfg.get("dprope") or {}).get("temperature_folded") or 1.0)
