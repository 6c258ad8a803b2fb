"""Export stage: a baked HF checkpoint (or a GGUF base) to GGUF with the RoPE factors, for llama.cpp runtimes.

Tensors are streamed: every tensor's info is declared from the safetensors headers, then each tensor is read,
converted and written on its own (large 2-D tensors in row blocks), so memory stays bounded by a block, not by the
model.  The factors go in as ``rope_freqs.weight`` (F32, head_dim/2, read by arch ``llama`` in every llama.cpp since
mid-2024) or, with ``rope_layout="longrope"``, as ``rope_factors_long/short.weight`` with
``rope.scaling.type = longrope`` (llama.cpp from April 2026, llama-cpp-python >= 0.3.21).  ``rope.scaling.factor`` is
never written next to factor tensors: llama.cpp would scale twice.

Llama, Mistral and Qwen2 are all written as arch ``llama`` (llama.cpp's qwen2 graph does not read factor tensors;
its llama graph takes Qwen2's q/k/v biases): q/k weights and biases get the rotate-half -> adjacent-pairs permutation.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from convert.compat import gguf_write_tensor_blocks as _write_raw
from convert.errors import ConvertError
from convert.io.files import atomic_file
from convert.io.gguf_tokenizer import write_tokenizer
from convert.arch import ARCHES, head_dim_of, lookup_arch, read_config
from convert.names import OUTTYPES, ROPE_LAYOUTS

log = logging.getLogger(__name__)

_BLOCK_BYTES = 16 << 20  # rows per conversion block: ~16 MB of float32


# ----------------------------------------------------------------------------------------------- tensors
def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """HF rotate-half layout -> GGUF adjacent pairs, for q (n_head) and k (n_head_kv), weights or biases."""
    rows = w.shape[0]
    return w.reshape(n_head, 2, rows // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


@dataclass
class _Tensor:
    hf_name: str
    gguf_name: str
    shape: tuple[int, ...]
    file: Path
    qtype: Any  # GGMLQuantizationType
    permute_heads: int = 0
    dtype: str = "F32"  # safetensors dtype
    offset: int = 0  # absolute byte offset of the tensor's data in its file


_ST_DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16}


def _read_rows(f, t: _Tensor, r0: int, r1: int) -> np.ndarray:
    """Rows r0:r1 of a safetensors tensor as float32, read with plain reads (no memory map, so nothing of the
    shard stays resident); bf16 is widened exactly by a 16-bit shift."""
    np_dtype = _ST_DTYPES[t.dtype]
    row = int(np.prod(t.shape[1:], dtype=np.int64)) if len(t.shape) > 1 else 1
    item = np.dtype(np_dtype).itemsize
    count = (r1 - r0) * row if len(t.shape) > 1 else int(np.prod(t.shape))
    f.seek(t.offset + r0 * row * item)
    raw = np.fromfile(f, dtype=np_dtype, count=count)
    if raw.size != count:
        raise ConvertError(f"{t.file} ended inside tensor {t.hf_name}: the shard is truncated")
    if t.dtype == "BF16":
        wide = raw.astype(np.uint32)
        wide <<= 16  # in place: one temporary, not two
        raw = wide.view(np.float32)
    return raw.astype(np.float32, copy=False).reshape((r1 - r0, *t.shape[1:]) if len(t.shape) > 1 else t.shape)


def _plan_tensors(ckpt: Path, cfg: dict, outtype: str) -> list[_Tensor]:
    import gguf

    from convert.io.safetensors_io import INDEX_NAME, SINGLE_NAME, safetensors_layout

    idx = ckpt / INDEX_NAME
    if idx.exists():
        wmap = json.loads(idx.read_text())["weight_map"]
        files = sorted(set(wmap.values()))
    elif (ckpt / SINGLE_NAME).exists():
        files = [SINGLE_NAME]
    else:
        raise ConvertError(f"no safetensors weights in {ckpt}")
    n_layer = int(cfg["num_hidden_layers"])
    n_head = int(cfg["num_attention_heads"])
    n_kv = int(cfg.get("num_key_value_heads") or n_head)
    tmap = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, n_layer)
    qt = gguf.GGMLQuantizationType
    out: list[_Tensor] = []
    unknown = []
    for fname in files:
        header, data_start = safetensors_layout(ckpt / fname)
        for name, info in header.items():
            if name == "__metadata__" or name.endswith("rotary_emb.inv_freq"):
                continue
            if name == "lm_head.weight" and cfg.get("tie_word_embeddings"):
                continue
            gname = tmap.get_name(name, try_suffixes=(".weight", ".bias"))
            if gname is None:
                unknown.append(name)
                continue
            shape = tuple(info["shape"])
            if len(shape) == 1 or outtype == "f32":
                q = qt.F32
            elif outtype == "q8_0" and shape[-1] % 32 == 0:
                q = qt.Q8_0
            elif outtype == "bf16":
                q = qt.BF16
            else:
                q = qt.F16  # f16, and q8_0 rows that are not a multiple of 32
            perm = n_head if ".self_attn.q_proj." in name else n_kv if ".self_attn.k_proj." in name else 0
            if info["dtype"] not in _ST_DTYPES:
                raise ConvertError(f"tensor {name} is {info['dtype']}; GGUF export reads F32, F16 and BF16 weights")
            out.append(_Tensor(name, gname, shape, ckpt / fname, q, perm, info["dtype"],
                               data_start + int(info["data_offsets"][0])))
    if unknown:
        raise ConvertError(f"tensors with no GGUF name: {', '.join(unknown[:5])}; this architecture layout is not "
                           "supported for GGUF export")
    return out


def _nbytes(shape: tuple[int, ...], qtype) -> int:
    import gguf

    return int(np.prod(gguf.quants.quant_shape_to_byte_shape(shape, qtype)))


def _convert(arr: np.ndarray, qtype) -> np.ndarray:
    import gguf

    qt = gguf.GGMLQuantizationType
    if qtype == qt.F32:
        return np.ascontiguousarray(arr, dtype=np.float32)
    if qtype == qt.F16:
        return arr.astype(np.float16)
    return gguf.quants.quantize(np.ascontiguousarray(arr, dtype=np.float32), qtype)


def _row_blocks(t: _Tensor) -> Iterator[tuple[int, int]]:
    rows = t.shape[0]
    if t.permute_heads or len(t.shape) == 1:
        yield 0, rows
        return
    per_row = 4 * int(np.prod(t.shape[1:]))
    step = max(1, _BLOCK_BYTES // per_row)
    for r in range(0, rows, step):
        yield r, min(rows, r + step)


# ----------------------------------------------------------------------------------------------- metadata
@dataclass
class RopeMeta:
    rope_theta: float
    head_dim: int
    target: int
    original: int | None
    long: list[float] | None
    short: list[float] | None
    attn_factor: float

    @classmethod
    def from_config(cls, cfg: dict) -> "RopeMeta":
        from convert.arch import rope_params

        p = rope_params(cfg)
        head_dim = head_dim_of(cfg)
        rt = p.get("rope_type", "default")
        if rt not in ("longrope", "default"):
            raise ConvertError(f"rope type '{rt}' is not exported by this tool; extend the checkpoint with "
                               "`dprope extend` first (it writes the longrope form)")
        long = p.get("long_factor") if rt == "longrope" else None
        short = p.get("short_factor") if rt == "longrope" else None
        for nm, f in (("long_factor", long), ("short_factor", short)):
            if f is not None and len(f) != head_dim // 2:
                raise ConvertError(f"{nm} has {len(f)} values, head_dim {head_dim} needs {head_dim // 2}")
        return cls(float(p["rope_theta"]), head_dim, int(cfg["max_position_embeddings"]),
                   int(p["original_max_position_embeddings"]) if rt == "longrope" else None, long, short,
                   float(p.get("attention_factor") or 1.0))


def _add_rope(writer, meta: RopeMeta, layout: str) -> list[tuple[str, np.ndarray]]:
    """RoPE keys; returns the factor tensors to write (name, float32 array)."""
    import gguf

    writer.add_context_length(meta.target)
    writer.add_rope_freq_base(meta.rope_theta)
    writer.add_rope_dimension_count(meta.head_dim)
    if meta.long is None:
        return []
    writer.add_rope_scaling_orig_ctx_len(meta.original)
    long = np.asarray(meta.long, dtype=np.float32)
    if layout == "freqs":
        # llama.cpp reads <arch>.rope.scaling.attn_factor for every architecture and multiplies cos/sin by it in
        # ggml_rope_ext also when no YaRN is active (src/llama-model.cpp, ggml/src/ggml-cpu/ops.cpp rope_yarn):
        # the temperature travels with rope_freqs.  Written only when it is not 1, so plain files stay as before.
        if not math.isclose(meta.attn_factor, 1.0, rel_tol=0, abs_tol=1e-9):
            writer.add_rope_scaling_attn_factors(meta.attn_factor)
        return [("rope_freqs.weight", long)]
    writer.add_rope_scaling_type(gguf.RopeScalingType.LONGROPE)
    writer.add_rope_scaling_attn_factors(meta.attn_factor)
    return [("rope_factors_long.weight", long),
            ("rope_factors_short.weight", np.asarray(meta.short, dtype=np.float32))]


def _add_provenance(writer, ckpt: Path, cfg: dict, name: str | None) -> None:
    card = cfg.get("dprope") or {}
    recipe = {}
    rp = ckpt / "dprope_recipe.yaml"
    if rp.exists():
        import yaml

        recipe = yaml.safe_load(rp.read_text()) or {}
    writer.add_name(name or ckpt.name)
    writer.add_type("model")
    if recipe.get("source"):
        writer.add_base_model_count(1)
        writer.add_base_model_name(0, Path(str(recipe["source"])).name)
    if card:
        writer.add_string("dprope.method", str(card.get("method", "")))
        writer.add_uint32("dprope.target_length", int(card.get("target_length", 0)))
        writer.add_string("dprope.version", str(card.get("version", "")))


# ----------------------------------------------------------------------------------------------- entry points
@contextlib.contextmanager
def _gguf_file(out: Path, force: bool, need_bytes: int | None = None) -> Iterator[tuple[Any, Path]]:
    """A GGUFWriter writing beside ``out``; the file is renamed into place only when the block completes.  A full
    disk is one ConvertError naming the folder and ``need_bytes``, and leaves no partial file."""
    import gguf

    if out.exists() and not force:
        raise ConvertError(f"{out} already exists; pass --force to replace it")
    with atomic_file(out, need_bytes) as tmp:
        writer = gguf.GGUFWriter(None, "llama")
        try:
            yield writer, tmp
        except BaseException:
            with contextlib.suppress(Exception):
                writer.close()
            raise
        writer.close()  # flushes: a full disk shows here at the latest, before the file is renamed into place


def export_gguf(ckpt: Path, out: Path, outtype: str = "f16", rope_layout: str = "freqs", *, force: bool = False,
                progress: bool = True, name: str | None = None, drop_factors: bool = False) -> Path:
    """Write ``out`` (.gguf) from the HF checkpoint ``ckpt``.  ``drop_factors`` omits the factor tensors (a
    negative control for tests and verify)."""
    import gguf
    from tqdm.auto import tqdm

    ckpt, out = Path(ckpt), Path(out)
    if outtype not in OUTTYPES:
        raise ConvertError(f"--outtype must be one of {', '.join(OUTTYPES)}, got '{outtype}'")
    if rope_layout not in ROPE_LAYOUTS:
        raise ConvertError(f"--rope-layout must be one of {', '.join(ROPE_LAYOUTS)}, got '{rope_layout}'")
    if out.exists() and not force:
        raise ConvertError(f"{out} already exists; pass --force to replace it")
    cfg = read_config(ckpt)
    arch = lookup_arch(cfg.get("model_type"), cfg.get("architectures"))
    if not arch.export_gguf:
        raise ConvertError(f"`dprope export-gguf` writes the llama graph's tensors ({', '.join(a.model_type for a in ARCHES if a.export_gguf)}); "
                           f"{arch} has its own: convert {ckpt} with llama.cpp's convert_hf_to_gguf.py (its YaRN keys "
                           "carry over), or extend the model's own GGUF in place (dprope extend MODEL.gguf OUT.gguf)")
    meta = RopeMeta.from_config(cfg)
    tensors = _plan_tensors(ckpt, cfg, outtype)
    n_vocab = int(cfg["vocab_size"])
    # tensors plus metadata (the vocabulary is the bulk of it; tokenizer.json is a generous measure)
    need = sum(_nbytes(t.shape, t.qtype) for t in tensors) + (1 << 20) + sum(
        f.stat().st_size for f in (ckpt / "tokenizer.json", ckpt / "tokenizer.model") if f.exists())

    with _gguf_file(out, force, need) as (writer, tmp):
        _add_provenance(writer, ckpt, cfg, name)
        writer.add_block_count(int(cfg["num_hidden_layers"]))
        writer.add_embedding_length(int(cfg["hidden_size"]))
        writer.add_feed_forward_length(int(cfg["intermediate_size"]))
        writer.add_head_count(int(cfg["num_attention_heads"]))
        writer.add_head_count_kv(int(cfg.get("num_key_value_heads") or cfg["num_attention_heads"]))
        writer.add_key_length(meta.head_dim)
        writer.add_value_length(meta.head_dim)
        writer.add_layer_norm_rms_eps(float(cfg.get("rms_norm_eps", 1e-6)))
        writer.add_vocab_size(n_vocab)
        ft = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
              "bf16": gguf.LlamaFileType.MOSTLY_BF16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[outtype]
        writer.add_file_type(ft)
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        factor_tensors = [] if drop_factors else _add_rope(writer, meta, rope_layout)
        if drop_factors:
            writer.add_context_length(meta.target)
            writer.add_rope_freq_base(meta.rope_theta)
            writer.add_rope_dimension_count(meta.head_dim)
        family = write_tokenizer(writer, ckpt, n_vocab)
        log.info("tokenizer: %s", family)

        for name_, arr in factor_tensors:
            writer.add_tensor_info(name_, arr.shape, arr.dtype, arr.nbytes)
        for t in tensors:
            nbytes = _nbytes(t.shape, t.qtype)
            dtype = np.float32 if t.qtype == gguf.GGMLQuantizationType.F32 else \
                np.float16 if t.qtype == gguf.GGMLQuantizationType.F16 else np.uint8
            shape = t.shape if dtype != np.uint8 else gguf.quants.quant_shape_to_byte_shape(t.shape, t.qtype)
            writer.add_tensor_info(t.gguf_name, shape, np.dtype(dtype), nbytes,
                                   raw_dtype=None if dtype != np.uint8 else t.qtype)
        writer.write_header_to_file(tmp)
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for _, arr in factor_tensors:
            _write_raw(writer, [arr], arr.nbytes)
        total = sum(_nbytes(t.shape, t.qtype) for t in tensors)
        from collections import deque
        from concurrent.futures import ThreadPoolExecutor

        def convert_block(path: Path, t: _Tensor, r0: int, r1: int) -> np.ndarray:
            with open(path, "rb") as f:  # one handle per block: blocks are read on several threads
                a = _read_rows(f, t, r0, r1)
            if t.permute_heads:
                a = _permute(a, t.permute_heads)
            return _convert(a, t.qtype)

        # row blocks are read and converted on worker threads (numpy releases the GIL) and written in order;
        # plain reads, no memory map: resident memory is the blocks in flight, not the shards
        workers = max(1, min(4, os.cpu_count() or 1))
        with tqdm(total=total, unit="B", unit_scale=True, desc=f"gguf {outtype}", disable=not progress) as bar, \
                ThreadPoolExecutor(workers) as pool:
            for t in tensors:
                def blocks(t=t):
                    # a sliding window of 2 x workers blocks in flight, written in order as each one is ready
                    pending: deque = deque()
                    for r0, r1 in _row_blocks(t):
                        pending.append(pool.submit(convert_block, t.file, t, r0, r1))
                        if len(pending) >= 2 * workers:
                            b = pending.popleft().result()
                            bar.update(b.nbytes)
                            yield b
                    while pending:
                        b = pending.popleft().result()
                        bar.update(b.nbytes)
                        yield b

                _write_raw(writer, blocks(), _nbytes(t.shape, t.qtype))
    log.info("wrote %s (%s, %d tensors, rope layout %s)", out, outtype, len(tensors) + len(factor_tensors),
             "none" if drop_factors else rope_layout)
    return out


def reemit_gguf(base: Path, ckpt: Path, out: Path, rope_layout: str = "freqs", *, force: bool = False) -> Path:
    """GGUF in, GGUF out: every tensor of ``base`` byte for byte in its own quantisation, plus the factor tensors
    and RoPE metadata of the baked checkpoint ``ckpt`` (extended from that base)."""
    import gguf

    base, ckpt, out = Path(base), Path(ckpt), Path(out)
    try:
        reader = gguf.GGUFReader(str(base))  # every field with its value type, and memory-mapped tensor data
    except Exception as e:  # gguf-py raises ValueError / struct.error / OSError on bad files
        raise ConvertError(f"{base} is not a readable GGUF file ({type(e).__name__}: {e})") from None

    def field(key: str, default=None):
        f = reader.fields.get(key)
        return default if f is None else f.contents()

    arch = field("general.architecture")
    if arch != "llama":
        raise ConvertError(f"GGUF re-emission supports arch llama, {base} is '{arch}'")
    meta = RopeMeta.from_config(read_config(ckpt))
    if meta.long is None:
        raise ConvertError(f"{ckpt} carries no factors; pass a checkpoint made by `dprope extend`")
    n_rot = int(field("llama.rope.dimension_count", meta.head_dim))
    if n_rot != meta.head_dim:
        raise ConvertError(f"{base} has rope dimension {n_rot}, {ckpt} has head_dim {meta.head_dim}: not its base")
    replaced = {"llama.context_length", "llama.rope.freq_base", "llama.rope.dimension_count",
                "llama.rope.scaling.type", "llama.rope.scaling.factor", "llama.rope.scaling.original_context_length",
                "llama.rope.scaling.attn_factor", "general.architecture", "dprope.method", "dprope.target_length",
                "dprope.version"}
    with _gguf_file(out, force, base.stat().st_size + (1 << 20)) as (writer, tmp):
        for key, field in reader.fields.items():
            if key.startswith("GGUF.") or key in replaced:
                continue
            vtype = field.types[0]
            sub = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
            val = field.contents()
            writer.add_key_value(key, val, vtype, sub_type=sub)
        factor_tensors = _add_rope(writer, meta, rope_layout)
        cfg = read_config(ckpt)
        if cfg.get("dprope"):
            writer.add_string("dprope.method", str(cfg["dprope"].get("method", "")))
            writer.add_uint32("dprope.target_length", meta.target)
        for name_, arr in factor_tensors:
            writer.add_tensor_info(name_, arr.shape, arr.dtype, arr.nbytes)
        kept = [t for t in reader.tensors if not t.name.startswith("rope_")]
        for t in kept:
            writer.add_tensor_info(t.name, t.data.shape, t.data.dtype, int(t.n_bytes), raw_dtype=t.tensor_type)
        writer.write_header_to_file(tmp)
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for _, arr in factor_tensors:
            _write_raw(writer, [arr], arr.nbytes)
        for t in kept:
            _write_raw(writer, [t.data], int(t.n_bytes))  # a view of the memory-mapped base: the original bytes
    return out
