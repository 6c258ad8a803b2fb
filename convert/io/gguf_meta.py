"""A lean GGUF header reader: metadata and tensor infos in one pass over the header, nothing else.

gguf-py's ``GGUFReader`` builds a numpy memmap view for every part of every field, which costs seconds on a
Llama-3-sized vocabulary (128k token strings and 280k merges).  The checks, ``inspect`` and the source stage only
need the scalar metadata, the tensor table and a few small tensors, so this reader walks the header with
``struct`` over a memory map, skips the big token arrays without decoding them, and reads tensor data only when
asked for.

``read_layout`` is the same walk for a byte-level rewrite (convert/io/gguf_rewrite.py): where each metadata entry
and each tensor-info entry lies in the file, so untouched entries can be copied as they are, with no vocabulary-sized
array decoded.  Both read the header in one walk, remembered per file (a command reads the same header several times).

The format (ggml-org/ggml docs/gguf.md): magic ``GGUF``, uint32 version, uint64 tensor count, uint64 metadata count
(v2 onwards; v1 used uint32 counts), then the metadata (key: uint64 length + UTF-8 bytes, uint32 value type,
value), the tensor infos (name, uint32 n_dims, uint64 dims, uint32 ggml type, uint64 offset relative to the data
section), padding to ``general.alignment`` (default 32), and the data section.
"""

from __future__ import annotations

import math
import mmap
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from convert.errors import ConvertError

# GGUFValueType names -> ids (ggml-org/ggml docs/gguf.md "gguf_metadata_value_type"; gguf-py's GGUFValueType)
VALUE_TYPES = {"UINT8": 0, "INT8": 1, "UINT16": 2, "INT16": 3, "UINT32": 4, "INT32": 5, "FLOAT32": 6, "BOOL": 7,
               "STRING": 8, "ARRAY": 9, "UINT64": 10, "INT64": 11, "FLOAT64": 12}
# GGUFValueType ids (gguf spec): scalar struct formats; 7 = bool, 8 = string, 9 = array
_SCALAR = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_NP = {0: np.uint8, 1: np.int8, 2: np.uint16, 3: np.int16, 4: np.uint32, 5: np.int32, 6: np.float32, 7: np.bool_,
       10: np.uint64, 11: np.int64, 12: np.float64}
_U64 = struct.Struct("<Q")  # a string's length prefix; precompiled: a vocabulary has 10^5 of them
# arrays never decoded into the metadata dict (vocabulary-sized); their lengths are kept as "<key>#len"
BIG_ARRAYS = ("tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.token_type", "tokenizer.ggml.scores")


# GGML type id -> (name, block size, bytes per block) of the types GGUF files are commonly made of, as gguf-py's
# constants.py GGML_QUANT_SIZES has them (a test checks each against the installed gguf), so that reading a header
# needs no gguf import; any other id is looked up in gguf-py's own table
GGML_SIZES = {0: ("F32", 1, 4), 1: ("F16", 1, 2), 2: ("Q4_0", 32, 18), 3: ("Q4_1", 32, 20), 6: ("Q5_0", 32, 22),
              7: ("Q5_1", 32, 24), 8: ("Q8_0", 32, 34), 10: ("Q2_K", 256, 84), 11: ("Q3_K", 256, 110),
              12: ("Q4_K", 256, 144), 13: ("Q5_K", 256, 176), 14: ("Q6_K", 256, 210), 24: ("I8", 1, 1),
              25: ("I16", 1, 2), 26: ("I32", 1, 4), 27: ("I64", 1, 8), 28: ("F64", 1, 8), 30: ("BF16", 1, 2)}


def ggml_type(type_id: int) -> tuple[str, int, int]:
    """(name, block size, bytes per block) of a GGML type id: :data:`GGML_SIZES`, else gguf-py's own table
    (ValueError or KeyError for an id it does not know either)."""
    if type_id in GGML_SIZES:
        return GGML_SIZES[type_id]
    from convert.io.gguf_constants import constants

    gc = constants()
    qt = gc.GGMLQuantizationType(type_id)
    return (qt.name, *gc.GGML_QUANT_SIZES[qt])


@dataclass
class GGUFTensor:
    """One tensor of a GGUF file: name, type, shape (GGUF order, fastest dimension first) and where its bytes are."""

    name: str
    type_id: int  # GGMLQuantizationType id
    shape: tuple[int, ...]
    offset: int  # absolute byte offset in the file
    n_bytes: int
    path: Path

    @property
    def tensor_type(self) -> Any:
        """gguf.GGMLQuantizationType of the tensor."""
        from convert.io.gguf_constants import constants

        return constants().GGMLQuantizationType(self.type_id)

    @property
    def type_name(self) -> str:
        """The type's name (F32, Q4_K, ...)."""
        return ggml_type(self.type_id)[0]

    @property
    def data(self) -> np.ndarray:
        """The tensor's bytes: float32 / float16 values for F32 / F16 (numpy order), raw uint8 otherwise."""
        name = self.type_name
        dtype = np.float32 if name == "F32" else np.float16 if name == "F16" else np.uint8
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            arr = np.fromfile(f, dtype=dtype, count=self.n_bytes // np.dtype(dtype).itemsize)
        if arr.nbytes != self.n_bytes:
            raise ConvertError(f"{self.path} ends inside tensor {self.name}: the file is truncated; re-create it")
        return arr.reshape(tuple(reversed(self.shape))) if dtype is not np.uint8 else arr


@dataclass
class GGUFInfo:
    meta: dict[str, Any]
    tensors: list[GGUFTensor]


@dataclass
class KVEntry:
    """One metadata entry and the bytes it occupies, ``[start, end)``: its key, value type and value."""

    key: str
    vtype: int  # GGUFValueType id
    start: int  # absolute offset of the key's length prefix
    end: int  # just past the value
    value: Any = None  # scalars and strings; None for arrays
    count: int | None = None  # arrays: their length


@dataclass
class TensorEntry:
    """One tensor-info entry, the bytes it occupies in the header ``[start, end)`` (the last 8 are its offset) and
    the extent of its data."""

    name: str
    dims: tuple[int, ...]
    ttype: int  # GGMLQuantizationType id
    offset: int  # relative to the start of the data section
    n_bytes: int
    start: int
    end: int


@dataclass
class GGUFLayout:
    """Where everything lies in a GGUF file (checked against its size: no entry or tensor runs past the end)."""

    path: Path
    size: int
    version: int
    kvs: list[KVEntry]
    tensors: list[TensorEntry]
    alignment: int
    header_end: int  # just past the last tensor info
    data_start: int  # header_end rounded up to the alignment


SUPPORTED_VERSIONS = (2, 3)


class _Cursor:
    def __init__(self, buf, path: Path):
        self.buf, self.pos, self.path = buf, 0, path

    def cut(self) -> ConvertError:
        return ConvertError(f"{self.path} ends inside its GGUF header: the file is truncated or not a GGUF; "
                            "re-download or re-export it")

    def take(self, fmt: str):
        try:
            (v,) = struct.unpack_from(fmt, self.buf, self.pos)
        except struct.error:
            raise self.cut() from None
        self.pos += struct.calcsize(fmt)
        return v

    def string(self) -> str:
        n = self.take("<Q")
        if self.pos + n > len(self.buf):
            raise self.cut()
        s = bytes(self.buf[self.pos:self.pos + n])
        self.pos += n
        return s.decode("utf-8", errors="replace")

    def skip_strings(self, count: int) -> None:
        buf, pos, unpack = self.buf, self.pos, _U64.unpack_from
        try:
            for _ in range(count):
                pos += 8 + unpack(buf, pos)[0]
        except struct.error:
            raise self.cut() from None
        if pos > len(buf):
            raise self.cut()
        self.pos = pos

    def numbers(self, sub: int, count: int) -> np.ndarray:
        """A numeric array's values (a view of the buffer), bounds-checked; the cursor moves past them."""
        end = self.pos + count * np.dtype(_NP[sub]).itemsize
        if end > len(self.buf):
            raise self.cut()
        arr = np.frombuffer(self.buf, dtype=_NP[sub], count=count, offset=self.pos)
        self.pos = end
        return arr

    def skip_array(self, sub: int, count: int) -> None:
        if sub == 8:
            self.skip_strings(count)
        elif sub in _NP:  # bounds only: no view of the buffer is made
            end = self.pos + count * np.dtype(_NP[sub]).itemsize
            if end > len(self.buf):
                raise self.cut()
            self.pos = end
        else:
            for _ in range(count):
                self.value(sub, decode=False)

    def value(self, vtype: int, decode: bool = True) -> Any:
        if vtype in _SCALAR:
            return self.take(_SCALAR[vtype])
        if vtype == 8:
            if not decode:
                self.skip_strings(1)
                return None
            return self.string()
        if vtype == 9:
            sub, count = self.take("<I"), self.take("<Q")
            if not decode:
                self.skip_array(sub, count)
                return None
            if sub == 8:
                return [self.string() for _ in range(count)]
            if sub in _NP:
                return self.numbers(sub, count).tolist()
            return [self.value(sub) for _ in range(count)]  # nested arrays
        raise ConvertError(f"{self.path}: unknown GGUF value type {vtype}; the file is corrupt")


def _open_map(path: Path) -> tuple[mmap.mmap, int]:
    """A read-only map of the whole file (pages are read only where the walk touches them: the header)."""
    if not path.exists():
        raise ConvertError(f"{path} does not exist: pass a .gguf model file")
    if path.is_dir():
        raise ConvertError(f"{path} is a directory: pass a .gguf model file")
    try:
        with open(path, "rb") as f:
            size = f.seek(0, 2)
            if size < 24:
                raise ConvertError(f"{path} is not a readable GGUF file ({size} bytes): the file is truncated or not "
                                   "a GGUF; pass a .gguf model file")
            return mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ), size
    except OSError as e:
        raise ConvertError(f"{path} cannot be read ({e})") from None


def _version(mm, path: Path, min_version: int = 2, max_version: int | None = None) -> int:
    """The header's version, checked: the GGUF magic, v2 or later, at most ``max_version`` (big-endian named)."""
    if bytes(mm[:4]) != b"GGUF":
        raise ConvertError(f"{path} is not a GGUF file (no GGUF magic); pass a .gguf model file")
    (version,) = struct.unpack_from("<I", mm, 4)
    if version < min_version:
        raise ConvertError(f"{path} is GGUF v{version}; only v2 and later are read")
    if max_version is not None and version > max_version:
        swapped = int.from_bytes(version.to_bytes(4, "little"), "big")
        what = (f"a big-endian GGUF v{swapped}" if swapped in SUPPORTED_VERSIONS else f"GGUF version {version}")
        raise ConvertError(f"{path} is {what}; only little-endian GGUF v{min_version} to v{max_version} can be "
                           "rewritten. Re-convert the model with a current llama.cpp (convert_hf_to_gguf.py), or "
                           "update dprope")
    return version


# the last few headers walked, by file identity: one command reads the same header for the spec, the checks and the
# rewrite, and a vocabulary of 10^5 strings costs tens of milliseconds a walk (each string's length leads to the next)
_WALKS: dict[tuple, tuple] = {}
_WALKS_KEPT = 4


def _file_key(path: Path) -> tuple:
    st = path.stat()
    return (str(path.resolve()), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


def _keep(key: tuple, walk: tuple) -> None:
    while len(_WALKS) >= _WALKS_KEPT:
        _WALKS.pop(next(iter(_WALKS)))
    _WALKS[key] = walk


def _walked(path: Path, min_version: int = 2, max_version: int | None = None):
    """:func:`_walk` of ``path`` (vocabulary-sized arrays skipped, every other value decoded), remembered while the
    file keeps its inode, size and modification time."""
    mm, size = _open_map(path)
    try:
        _version(mm, path, min_version, max_version)
        key = _file_key(path)
        walk = _WALKS.get(key)
        if walk is None:
            walk = _walk(mm, path, _decoded)
            _keep(key, walk)
    finally:
        mm.close()
    return size, walk


def _decoded(key: str) -> bool:
    return key not in BIG_ARRAYS


def _kv(c: _Cursor, decode_array) -> KVEntry:
    """The metadata entry at the cursor; the cursor moves past it."""
    start = c.pos
    key = c.string()
    vtype = c.take("<I")
    if vtype == 9:
        at = c.pos
        sub, count = c.take("<I"), c.take("<Q")
        if decode_array(key):
            c.pos = at
            value = c.value(9)
        else:
            c.skip_array(sub, count)
            value = None
        return KVEntry(key, vtype, start, c.pos, value, count)
    value = c.value(vtype)
    return KVEntry(key, vtype, start, c.pos, value)


def _walk(mm, path: Path, decode_array):
    """One pass over the header: (version, [KVEntry], [(name, dims, ttype, offset, start, end)], header_end).
    ``decode_array(key)``: True to decode that array's values into ``KVEntry.value``, False to skip them."""
    c = _Cursor(mm, path)
    version = _version(mm, path)
    c.pos = 8
    n_tensors, n_kv = c.take("<Q"), c.take("<Q")
    kvs = [_kv(c, decode_array) for _ in range(n_kv)]
    infos = []
    for _ in range(n_tensors):
        start = c.pos
        name = c.string()
        dims = tuple(c.take("<Q") for _ in range(c.take("<I")))
        ttype, offset = c.take("<I"), c.take("<Q")
        infos.append((name, dims, ttype, offset, start, c.pos))
    return version, kvs, infos, c.pos


def decode_kv(entry: bytes, at: int, path: Path) -> KVEntry:
    """One encoded metadata entry (key, type, value) as the header walk reads it, placed at offset ``at``."""
    kv = _kv(_Cursor(entry, path), _decoded)
    if kv.end != len(entry):  # pragma: no cover - an encoder's error, never a user's
        raise ConvertError(f"metadata {kv.key}: {len(entry)} bytes encoded, {kv.end} read back; this is a bug")
    kv.start, kv.end = at, at + len(entry)
    return kv


def remember_walk(path: Path, version: int, kvs: list[KVEntry], infos: list[tuple], header_end: int) -> None:
    """Record the header walk of a file just written whose layout the writer knows (the rewrite plans every entry's
    place), so reading it back (the summary a command prints) does not walk its vocabulary again."""
    _keep(_file_key(Path(path)), (version, kvs, infos, header_end))


def _tensor_bytes(path: Path, name: str, dims: tuple[int, ...], ttype: int) -> int:
    """The byte size of one tensor, from its type's block size and bytes per block (gguf-py's GGML_QUANT_SIZES)."""
    try:
        _, block, tsize = ggml_type(ttype)
    except (ValueError, KeyError):
        raise ConvertError(f"{path}: tensor {name} has unknown type id {ttype}; the file is corrupt or newer "
                           "than this gguf-py (update the gguf package)") from None
    n = math.prod(dims) if dims else 1
    return n // block * tsize


def _alignment(path: Path, value: Any) -> int:
    """general.alignment: a power of two (llama.cpp refuses any other, ggml/src/gguf.cpp), 32 when absent."""
    if value is None:
        return 32
    if not isinstance(value, int) or value <= 0 or value & (value - 1):
        raise ConvertError(f"{path}: general.alignment is {value!r}, not a power of two; the file is corrupt")
    return value


def read_gguf(path: Path) -> GGUFInfo:
    """Metadata (vocabulary-sized arrays left out) and the tensor table of a GGUF file."""
    path = Path(path)
    size, (version, kvs, infos, header_end) = _walked(path)
    meta: dict[str, Any] = {"GGUF.version": version, "GGUF.tensor_count": len(infos), "GGUF.kv_count": len(kvs)}
    for kv in kvs:
        if kv.key in BIG_ARRAYS and kv.vtype == 9:
            meta[f"{kv.key}#len"] = kv.count
        else:
            meta[kv.key] = kv.value
    align = int(meta.get("general.alignment", 32))
    start = -(-header_end // align) * align
    tensors = []
    for name, dims, ttype, offset, _, _ in infos:
        n_bytes = _tensor_bytes(path, name, dims, ttype)
        if start + offset + n_bytes > size:
            raise ConvertError(f"{path} ends inside tensor {name}: the file is truncated; re-download or re-export it")
        tensors.append(GGUFTensor(name, ttype, dims, start + offset, n_bytes, path))
    return GGUFInfo(meta, tensors)


def read_layout(path: Path) -> GGUFLayout:
    """Where each metadata entry, tensor info and tensor's data lies in a GGUF file; no vocabulary-sized array is
    decoded.  Refuses
    what a byte-level rewrite cannot keep whole: a missing or foreign file, GGUF versions other than 2 and 3
    (v1 has 32-bit counts; big-endian files are named as such), a header or data section shorter than the tensor
    table says, and an alignment that is not a power of two."""
    path = Path(path)
    size, (version, kvs, infos, header_end) = _walked(path, SUPPORTED_VERSIONS[0], SUPPORTED_VERSIONS[-1])
    align_kv = next((kv for kv in kvs if kv.key == "general.alignment"), None)
    alignment = _alignment(path, align_kv.value if align_kv else None)
    data_start = -(-header_end // alignment) * alignment
    tensors = []
    for name, dims, ttype, offset, start, end in infos:
        n_bytes = _tensor_bytes(path, name, dims, ttype)
        if data_start + offset + n_bytes > size:
            raise ConvertError(f"{path} ends inside tensor {name} ({size} bytes, the tensor table needs "
                               f"{data_start + offset + n_bytes}): the file is truncated; re-download or re-export "
                               "it")
        tensors.append(TensorEntry(name, dims, ttype, offset, n_bytes, start, end))
    return GGUFLayout(path, size, version, kvs, tensors, alignment, header_end, data_start)
