"""Rewrite a GGUF file's metadata and a few small tensors without touching the rest: a quantised model is never
dequantised, and no weight passes through Python memory.

Extending a model's context in a GGUF changes a handful of keys (``<arch>.context_length``, the rope scaling keys)
and adds or replaces one small F32 tensor (``rope_freqs.weight``); every other byte of the file can be copied as it
is.  The layout (ggml-org/ggml docs/gguf.md) makes that cheap: a tensor's offset is relative to the aligned start
of the data section, so a header that grows or shrinks moves the data section as a whole and unchanged tensors keep
their offsets.  The output is planned as a list of pieces, each either new bytes (a re-encoded entry, padding, a new
tensor) or a byte range of the source; adjacent ranges are merged, so the data section is copied in a few large
runs with ``os.copy_file_range`` (in-kernel, no user-space buffer; a read/write loop with a bounded buffer where the
filesystem refuses it).  The header is walked once over a memory map (convert/io/gguf_meta.py ``read_layout``):
vocabulary arrays are skipped, not decoded, and copied as byte ranges too.

llama.cpp accepts only a packed data section: tensor ``i``'s offset must equal the sum of the sizes of tensors
``0..i-1``, each rounded up to the alignment (ggml/src/gguf.cpp, ``gguf_init_from_file_impl``: "tensor '...' has
offset ..., expected ..."; gguf-py's GGUFWriter writes files this way).  So the output's offsets are always that
running sum in table order: a replaced tensor keeps its place in the table, tensors after it move only when its
padded size changes, and new tensors are appended after the others.
"""

from __future__ import annotations

import errno
import logging
import os
import struct
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np

from convert.errors import ConvertError
from convert.io.files import atomic_file, human_bytes
from convert.io.gguf_constants import constants
from convert.io.gguf_meta import (GGML_SIZES, VALUE_TYPES, GGUFLayout, KVEntry, decode_kv, ggml_type, read_layout,
                                  remember_walk)

log = logging.getLogger(__name__)

CHUNK = 8 << 20  # the read/write fallback's buffer
INLINE_BELOW = 64 << 10  # source ranges shorter than this are read into the plan rather than copied by the kernel
COPY_MAX = 0x7FFFF000  # bytes asked of one copy_file_range call: Linux's MAX_RW_COUNT, the most one call moves
PROGRESS_FROM = 512 << 20  # files below this are copied in well under a second: no progress bar (nor its import)
# errors that mean "copy_file_range cannot do this pair of files" rather than "the copy failed" (copy_file_range(2):
# EXDEV across filesystems before Linux 5.3 and again since 5.19 for some, EINVAL / EOPNOTSUPP on filesystems and
# special files without support, ENOSYS where the call is absent, EPERM / EACCES under some sandboxes)
_NO_FAST_COPY = frozenset({errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EPERM,
                           errno.EACCES, errno.ETXTBSY})
GGML_MAX_DIMS = 4  # ggml.h
GGML_MAX_NAME = 64  # ggml.h: a tensor name, NUL included

# GGUFValueType ids -> struct format (ggml-org/ggml docs/gguf.md, "gguf_metadata_value_type")
_SCALAR_FMT = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_INT_TYPES = frozenset({0, 1, 2, 3, 4, 5, 10, 11})
_FLOAT_TYPES = frozenset({6, 12})
# numpy dtype -> GGUFValueType id, for array values given as numpy arrays
_NP_VTYPE = {np.dtype(np.uint8): 0, np.dtype(np.int8): 1, np.dtype(np.uint16): 2, np.dtype(np.int16): 3,
             np.dtype(np.uint32): 4, np.dtype(np.int32): 5, np.dtype(np.float32): 6, np.dtype(np.bool_): 7,
             np.dtype(np.uint64): 10, np.dtype(np.int64): 11, np.dtype(np.float64): 12}
# numpy dtype -> GGMLQuantizationType name, for tensors given as plain arrays (gguf-py's GGUFWriter.add_tensor_info)
_NP_TENSOR = {np.dtype(np.float32): "F32", np.dtype(np.float16): "F16", np.dtype(np.float64): "F64",
              np.dtype(np.int8): "I8", np.dtype(np.int16): "I16", np.dtype(np.int32): "I32",
              np.dtype(np.int64): "I64"}


_PLAIN_IDS = {v[0]: k for k, v in GGML_SIZES.items() if v[1] == 1}  # F32 -> 0, F16 -> 1, ...


# ------------------------------------------------------------------------------------------- encoding
def _string(s: str | bytes) -> bytes:
    b = s.encode("utf-8") if isinstance(s, str) else bytes(s)
    return struct.pack("<Q", len(b)) + b


def _scalar(key: str, value: Any, vtype: int) -> bytes:
    name = _NAMES.get(vtype, f"type {vtype}")
    if vtype == 7:
        if not isinstance(value, (bool, np.bool_)):
            raise ConvertError(f"metadata {key}: {value!r} is not a BOOL; pass True or False")
    elif vtype in _INT_TYPES:
        if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
            raise ConvertError(f"metadata {key}: {value!r} is not an integer, so it cannot be stored as {name}; "
                               "pass an int")
        value = int(value)
    elif vtype in _FLOAT_TYPES:
        if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)):
            raise ConvertError(f"metadata {key}: {value!r} is not a number, so it cannot be stored as {name}")
        value = float(value)
    try:
        return struct.pack(_SCALAR_FMT[vtype], value)
    except (struct.error, OverflowError):
        raise ConvertError(f"metadata {key}: {value!r} does not fit {name}; pass a value in its range or choose a "
                           "wider type") from None


_NAMES = {v: k for k, v in VALUE_TYPES.items()}


def _array(key: str, value: Any) -> bytes:
    """sub-type, count and items.  A numpy array carries its element type (np.uint32 -> UINT32); a list's element
    type is inferred as gguf-py's GGUFValueType.get_type does (str -> STRING, bool -> BOOL, int -> INT32,
    float -> FLOAT32, list -> ARRAY)."""
    gc = constants()
    if isinstance(value, np.ndarray):
        if value.ndim != 1:
            raise ConvertError(f"metadata {key}: an array value must be one-dimensional (got shape {value.shape})")
        sub = _NP_VTYPE.get(value.dtype.newbyteorder("=")) if value.dtype.kind != "U" else 8
        if sub is None:
            raise ConvertError(f"metadata {key}: numpy dtype {value.dtype} has no GGUF value type; use one of "
                               f"{', '.join(sorted(str(d) for d in _NP_VTYPE))}")
        if sub != 8:
            items = value.astype(value.dtype.newbyteorder("<"), copy=False).tobytes()
            return struct.pack("<IQ", sub, len(value)) + items
        value = value.tolist()
    if not isinstance(value, (list, tuple)):
        raise ConvertError(f"metadata {key}: an ARRAY value must be a list or a numpy array, not "
                           f"{type(value).__name__}")
    if not value:
        return struct.pack("<IQ", 8, 0)  # an empty array: the element type is moot; strings, as GGUFWriter does
    try:
        subs = {int(gc.GGUFValueType.get_type(v if not isinstance(v, tuple) else list(v))) for v in value}
    except ValueError as e:
        raise ConvertError(f"metadata {key}: {e}; pass str, bool, int, float or list items") from None
    if len(subs) != 1:
        raise ConvertError(f"metadata {key}: the array mixes element types; GGUF arrays hold one type")
    (sub,) = subs
    out = [struct.pack("<IQ", sub, len(value))]
    for v in value:
        out.append(encode_value(key, v, sub))
    return b"".join(out)


def encode_value(key: str, value: Any, vtype: Any) -> bytes:
    """The bytes of one metadata value (no key, no type id), strictly as ``vtype`` (a GGUFValueType or its id):
    a value that does not fit, or is of another kind, is refused rather than converted."""
    vtype = int(vtype)
    if vtype in _SCALAR_FMT:
        return _scalar(key, value, vtype)
    if vtype == 8:
        if not isinstance(value, (str, bytes, bytearray)):
            raise ConvertError(f"metadata {key}: {value!r} is not a STRING; pass a str")
        return _string(value)
    if vtype == 9:
        return _array(key, value)
    raise ConvertError(f"metadata {key}: unknown GGUF value type {vtype}; use a gguf.GGUFValueType")


def encode_kv(key: str, value: Any, vtype: Any) -> bytes:
    """One whole metadata entry: key, value type id, value."""
    if not isinstance(key, str) or not key:
        raise ConvertError(f"metadata key {key!r} is not a non-empty string")
    return _string(key) + struct.pack("<I", int(vtype)) + encode_value(key, value, vtype)


def _tensor_spec(name: str, data: Any) -> tuple[int, tuple[int, ...], bytes]:
    """(GGMLQuantizationType id, GGUF dims (fastest first), bytes) of a new tensor: a plain numpy array (F32, F16,
    F64, I8..I64, by dtype), or ``(uint8 array, GGMLQuantizationType)`` for quantised bytes as gguf.quants.quantize
    returns them (the last axis in bytes; gguf-py's quant_shape_from_byte_shape gives the element shape)."""
    if len(name.encode("utf-8")) >= GGML_MAX_NAME:
        raise ConvertError(f"tensor name {name!r} is {len(name.encode())} bytes; llama.cpp allows at most "
                           f"{GGML_MAX_NAME - 1} (GGML_MAX_NAME)")
    if isinstance(data, tuple):
        arr, qtype = data
        gc = constants()
        qtype = gc.GGMLQuantizationType(int(qtype))
        arr = np.asarray(arr)
        if qtype.name in ("F32", "F16", "F64", "I8", "I16", "I32", "I64", "BF16") and arr.dtype != np.uint8:
            shape = arr.shape
        else:
            if arr.dtype != np.uint8:
                raise ConvertError(f"tensor {name}: quantised ({qtype.name}) data must be a uint8 array of its bytes")
            import gguf

            shape = tuple(gguf.quant_shape_from_byte_shape(arr.shape, qtype))
    else:
        arr = np.asarray(data)
        tname = _NP_TENSOR.get(arr.dtype.newbyteorder("="))
        if tname is None:
            raise ConvertError(f"tensor {name}: numpy dtype {arr.dtype} has no GGML type; pass float32, float16, "
                               "float64 or an integer array, or (uint8 bytes, GGMLQuantizationType)")
        qtype = _PLAIN_IDS[tname]
        arr = arr.astype(arr.dtype.newbyteorder("<"), copy=False)
        shape = arr.shape
    if not 1 <= len(shape) <= GGML_MAX_DIMS:
        raise ConvertError(f"tensor {name}: {len(shape)} dimensions; GGUF tensors have 1 to {GGML_MAX_DIMS}")
    qname, block, tsize = ggml_type(int(qtype))
    n = int(np.prod(shape, dtype=np.int64))
    if shape[-1] % block or n // block * tsize != arr.nbytes:
        raise ConvertError(f"tensor {name}: {arr.nbytes} bytes do not hold a {qname} tensor of shape {shape}")
    return int(qtype), tuple(int(d) for d in reversed(shape)), np.ascontiguousarray(arr).tobytes()


def _tensor_info(name: str, dims: tuple[int, ...], ttype: int, offset: int) -> bytes:
    return _string(name) + struct.pack(f"<I{len(dims)}QIQ", len(dims), *dims, ttype, offset)


# ------------------------------------------------------------------------------------------- the plan
class _Plan:
    """The output as pieces: bytes, or (source offset, length) ranges; adjacent pieces of one kind are merged."""

    def __init__(self):
        self.pieces: list[bytes | tuple[int, int]] = []
        self.size = 0
        self.inlined = 0  # source bytes read into the plan by inline_small
        self.walk: tuple = ()  # the output's header as convert/io/gguf_meta.py's walk reads it

    def data(self, b: bytes) -> None:
        if not b:
            return
        if self.pieces and isinstance(self.pieces[-1], bytearray):
            self.pieces[-1] += b
        else:
            self.pieces.append(bytearray(b))
        self.size += len(b)

    def copy(self, offset: int, length: int) -> None:
        if not length:
            return
        last = self.pieces[-1] if self.pieces else None
        if isinstance(last, tuple) and last[0] + last[1] == offset:
            self.pieces[-1] = (last[0], last[1] + length)
        else:
            self.pieces.append((offset, length))
        self.size += length

    def pad(self, alignment: int) -> None:
        self.data(b"\0" * (-self.size % alignment))

    @property
    def copied(self) -> int:
        """Bytes taken unchanged from the source: kernel-copied ranges and inlined ones."""
        return sum(p[1] for p in self.pieces if isinstance(p, tuple)) + self.inlined

    def inline_small(self, src_fd: int, below: int) -> None:
        """Ranges shorter than ``below`` (a tensor info's name, dims and type; small metadata entries) read now and
        kept as bytes: one system call per large run instead of one per header entry."""
        pieces, self.pieces, size = self.pieces, [], self.size
        for p in pieces:
            if isinstance(p, tuple) and p[1] < below:
                b = os.pread(src_fd, p[1], p[0])
                if len(b) != p[1]:
                    raise ConvertError("the source ended inside its header while it was being read: it changed "
                                       "during the rewrite; leave it alone and run again")
                self.data(b)
                self.inlined += len(b)
            elif isinstance(p, tuple):
                self.pieces.append(p)
            else:
                self.data(p)
        self.size = size


def _plan(lay: GGUFLayout, set_kv: Mapping[str, tuple[Any, Any]], drop: set[str],
          new_tensors: dict[str, tuple[int, tuple[int, ...], bytes]]) -> tuple[_Plan, dict]:
    align = lay.alignment
    present = {kv.key for kv in lay.kvs}
    kv_bytes = {k: encode_kv(k, v, t) for k, (v, t) in set_kv.items()}
    kvs: list[bytes | KVEntry] = []  # new bytes, or the source's entry copied as it is
    for kv in lay.kvs:
        if kv.key in drop:
            continue
        kvs.append(kv_bytes.get(kv.key, kv))
    added_keys = [k for k in set_kv if k not in present]
    kvs += [kv_bytes[k] for k in added_keys]

    names = {t.name for t in lay.tensors}
    added = [n for n in new_tensors if n not in names]
    # the data section, in table order, each tensor at the running sum of padded sizes (llama.cpp's rule)
    table: list[tuple[str, Any]] = []  # (name, TensorEntry | new spec)
    for t in lay.tensors:
        table.append((t.name, new_tensors.get(t.name, t)))
    table += [(n, new_tensors[n]) for n in added]
    offsets, cursor = [], 0
    for _, item in table:
        offsets.append(cursor)
        n = item.n_bytes if not isinstance(item, tuple) else len(item[2])
        cursor += n + (-n % align)

    plan = _Plan()
    plan.data(b"GGUF" + struct.pack("<IQQ", lay.version, len(table), len(kvs)))
    # the output's header as gguf_meta's walk would read it, entry by entry (remember_walk)
    out_kvs: list[KVEntry] = []
    for piece in kvs:
        at = plan.size
        if isinstance(piece, KVEntry):
            plan.copy(piece.start, piece.end - piece.start)
            out_kvs.append(replace(piece, start=at, end=plan.size))
        else:
            plan.data(piece)
            out_kvs.append(decode_kv(piece, at, lay.path))
    out_infos = []
    for (name, item), off in zip(table, offsets):
        at = plan.size
        if isinstance(item, tuple):
            plan.data(_tensor_info(name, item[1], item[0], off))
            out_infos.append((name, item[1], item[0], off, at, plan.size))
        else:  # name, dims and type as they are; a new offset
            plan.copy(item.start, item.end - 8 - item.start)
            plan.data(struct.pack("<Q", off))
            out_infos.append((name, item.dims, item.ttype, off, at, plan.size))
    plan.walk = (lay.version, out_kvs, out_infos, plan.size)
    plan.pad(align)
    data_start = plan.size
    for (name, item), off in zip(table, offsets):
        assert plan.size == data_start + off
        if isinstance(item, tuple):
            plan.data(item[2])
            plan.pad(align)
            continue
        src = lay.data_start + item.offset
        padded = item.n_bytes + (-item.n_bytes % align)
        # the source's own padding is copied too where it is there, so neighbouring tensors merge into one run
        plan.copy(src, padded if src + padded <= lay.size else item.n_bytes)
        plan.pad(align)
    summary = {"keys_set": list(set_kv), "keys_added": added_keys,
               "keys_dropped": [kv.key for kv in lay.kvs if kv.key in drop],
               "tensors_kept": len(lay.tensors) - sum(t.name in new_tensors for t in lay.tensors),
               "tensors_replaced": [t.name for t in lay.tensors if t.name in new_tensors], "tensors_added": added}
    return plan, summary


# ------------------------------------------------------------------------------------------- copying
def _write_all(fd: int, data) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def _copy_range(src_fd: int, dst_fd: int, offset: int, length: int, state: dict) -> None:
    """Append ``length`` bytes of the source from ``offset`` to the destination (at its file position)."""
    while length:
        n = 0
        if state.get("fast", hasattr(os, "copy_file_range")):
            try:
                n = os.copy_file_range(src_fd, dst_fd, min(length, COPY_MAX), offset)
            except OSError as e:
                if e.errno not in _NO_FAST_COPY or state.get("fast"):
                    raise  # a real failure, or one after copy_file_range already worked for these files
                log.debug("copy_file_range refused (%s); copying through a %s buffer", e, human_bytes(CHUNK))
                state["fast"] = False
                continue
            state["fast"] = True
        else:
            buf = os.pread(src_fd, min(length, CHUNK), offset)
            n = len(buf)
            _write_all(dst_fd, buf)
        if n == 0:
            raise ConvertError(f"the source ended at byte {offset} while it was being copied: it changed or was "
                               "truncated during the rewrite; leave it alone and run again")
        offset += n
        length -= n
        if state.get("bar") is not None:
            state["bar"].update(n)


def _emit(plan: _Plan, src: Path, dst: Path, progress: bool) -> None:
    state: dict = {}
    bar = None
    if progress and plan.size >= PROGRESS_FROM:
        from tqdm import tqdm  # the terminal bar (tqdm.auto would import asyncio for notebooks: 30 ms per command)

        # shown once the copy has run a second
        bar = state["bar"] = tqdm(total=plan.size, unit="B", unit_scale=True, desc=f"rewrite {dst.name}", delay=1.0)
    src_fd = os.open(src, os.O_RDONLY)
    try:
        dst_fd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)
        try:
            for piece in plan.pieces:
                if isinstance(piece, tuple):
                    _copy_range(src_fd, dst_fd, piece[0], piece[1], state)
                else:
                    _write_all(dst_fd, piece)
                    if bar is not None:
                        bar.update(len(piece))
            written = os.lseek(dst_fd, 0, os.SEEK_CUR)
            if written != plan.size:  # pragma: no cover - a bookkeeping error, never a user's
                raise ConvertError(f"rewrote {written} bytes of {dst}, planned {plan.size}; this is a bug")
        finally:
            os.close(dst_fd)
    finally:
        os.close(src_fd)
        if bar is not None:
            bar.close()


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.resolve() == b.resolve() or (b.exists() and os.path.samefile(a, b))
    except OSError:
        return False


def rewrite_gguf(src: Path, dst: Path, *, set_kv: Mapping[str, tuple[Any, Any]] = {},
                 drop_kv: Iterable[str] = (), set_tensors: Mapping[str, Any] = {}, progress: bool = True,
                 force: bool = False) -> dict:
    """Write ``dst`` as ``src`` with metadata keys in ``drop_kv`` removed, keys in ``set_kv`` set
    (``{key: (value, gguf.GGUFValueType)}``, strictly typed: replaced where the key is, else appended) and tensors in
    ``set_tensors`` replaced (same name; type and shape may change) or added (appended after the others).  A tensor
    is a numpy array (F32, F16, F64, I8..I64 by dtype) or ``(uint8 bytes, GGMLQuantizationType)``.  Every other
    metadata entry and tensor is copied byte for byte; the source's GGUF version and alignment are kept.

    Written beside ``dst`` and renamed into place only when complete; on any error nothing is left.  Refuses an
    existing ``dst`` unless ``force``, and ``dst`` == ``src``.  Returns a summary: bytes written and copied, seconds,
    the tensors kept / replaced / added and the keys set / added / dropped."""
    t0 = time.perf_counter()
    src, dst = Path(src), Path(dst)
    set_kv = dict(set_kv)
    drop = set(drop_kv)
    if both := sorted(drop & set(set_kv)):
        raise ConvertError(f"metadata {', '.join(both)} both set and dropped; pass each key to one of them")
    if "general.alignment" in drop or "general.alignment" in set_kv:
        raise ConvertError("general.alignment cannot be changed by a rewrite: the data section is copied with the "
                           "source's alignment; re-export the model to change it")
    if bad := sorted(k for k in list(set_kv) + list(drop) if k.startswith("GGUF.")):
        raise ConvertError(f"{', '.join(bad)}: GGUF.* names are gguf-py's header fields, not metadata keys")
    for k, v in set_kv.items():
        if not (isinstance(v, tuple) and len(v) == 2):
            raise ConvertError(f"metadata {k}: pass (value, gguf.GGUFValueType), e.g. (32768, GGUFValueType.UINT32)")
    lay = read_layout(src)  # refuses a missing, foreign, truncated or unsupported file, naming it
    if _same_file(src, dst):
        raise ConvertError(f"{dst} is the source file; write the rewrite to another path (it is renamed into "
                           "place only when complete)")
    if dst.is_dir():
        raise ConvertError(f"{dst} is a directory; pass the output .gguf file's path")
    if dst.exists() and not force:
        raise ConvertError(f"{dst} already exists; pass force=True (--force) to replace it or choose another path")
    new_tensors = {name: _tensor_spec(name, data) for name, data in set_tensors.items()}
    plan, summary = _plan(lay, set_kv, drop, new_tensors)
    try:
        fd = os.open(src, os.O_RDONLY)
        try:
            plan.inline_small(fd, INLINE_BELOW)
        finally:
            os.close(fd)
    except OSError as e:
        raise ConvertError(f"{src} cannot be read ({e})") from None
    log.info("rewriting %s -> %s: %s in %d pieces, %s of it copied from the source", src, dst,
             human_bytes(plan.size), len(plan.pieces), human_bytes(plan.copied))
    try:
        with atomic_file(dst, need_bytes=plan.size) as tmp:
            _emit(plan, src, tmp, progress)
        remember_walk(dst, *plan.walk)
    except OSError as e:  # a full disk became a ConvertError in atomic_file; anything else is named here
        raise ConvertError(f"rewriting {src} into {dst} failed ({e}); nothing was left behind. Check that the "
                           "source is readable and the output folder writable, then run again") from None
    summary = {"src": str(src), "dst": str(dst), "bytes_written": plan.size, "bytes_copied": plan.copied,
               "seconds": time.perf_counter() - t0, **summary}
    log.info("wrote %s: %d tensors kept, replaced %s, added %s; keys set %s, dropped %s", dst,
             summary["tensors_kept"], summary["tensors_replaced"] or "none", summary["tensors_added"] or "none",
             summary["keys_set"] or "none", summary["keys_dropped"] or "none")
    return summary
