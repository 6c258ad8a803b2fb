"""A lean GGUF header reader: metadata and tensor infos in one pass over the header, nothing else.

gguf-py's ``GGUFReader`` builds a numpy memmap view for every part of every field, which costs seconds on a
Llama-3-sized vocabulary (128k token strings and 280k merges).  The checks, ``inspect`` and the source stage only
need the scalar metadata, the tensor table and a few small tensors, so this reader walks the header with
``struct`` over a memory map, skips the big token arrays without decoding them, and reads tensor data only when
asked for.
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from convert.errors import ConvertError

# GGUFValueType ids (gguf spec): scalar struct formats; 7 = bool, 8 = string, 9 = array
_SCALAR = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_NP = {0: np.uint8, 1: np.int8, 2: np.uint16, 3: np.int16, 4: np.uint32, 5: np.int32, 6: np.float32, 7: np.bool_,
       10: np.uint64, 11: np.int64, 12: np.float64}
# arrays never decoded into the metadata dict (vocabulary-sized); their lengths are kept as "<key>#len"
BIG_ARRAYS = ("tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.token_type", "tokenizer.ggml.scores")


@dataclass
class GGUFTensor:
    """One tensor of a GGUF file: name, type, shape (GGUF order, fastest dimension first) and where its bytes are."""

    name: str
    tensor_type: Any  # gguf.GGMLQuantizationType
    shape: tuple[int, ...]
    offset: int  # absolute byte offset in the file
    n_bytes: int
    path: Path

    @property
    def data(self) -> np.ndarray:
        """The tensor's bytes: float32 / float16 values for F32 / F16 (numpy order), raw uint8 otherwise."""
        name = self.tensor_type.name
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


class _Cursor:
    def __init__(self, buf, path: Path):
        self.buf, self.pos, self.path = buf, 0, path

    def take(self, fmt: str):
        try:
            (v,) = struct.unpack_from(fmt, self.buf, self.pos)
        except struct.error:
            raise ConvertError(f"{self.path} ends inside its GGUF header: the file is truncated or not a GGUF") \
                from None
        self.pos += struct.calcsize(fmt)
        return v

    def string(self) -> str:
        n = self.take("<Q")
        if self.pos + n > len(self.buf):
            raise ConvertError(f"{self.path} ends inside its GGUF header: the file is truncated or not a GGUF")
        s = bytes(self.buf[self.pos:self.pos + n])
        self.pos += n
        return s.decode("utf-8", errors="replace")

    def skip_strings(self, count: int) -> None:
        buf, pos, unpack = self.buf, self.pos, struct.unpack_from
        try:
            for _ in range(count):
                pos += 8 + unpack("<Q", buf, pos)[0]
        except struct.error:
            raise ConvertError(f"{self.path} ends inside its GGUF header: the file is truncated") from None
        self.pos = pos

    def numbers(self, sub: int, count: int) -> np.ndarray:
        """A numeric array's values (a view of the buffer), bounds-checked; the cursor moves past them."""
        end = self.pos + count * np.dtype(_NP[sub]).itemsize
        if end > len(self.buf):
            raise ConvertError(f"{self.path} ends inside its GGUF header: the file is truncated")
        arr = np.frombuffer(self.buf, dtype=_NP[sub], count=count, offset=self.pos)
        self.pos = end
        return arr

    def skip_array(self, sub: int, count: int) -> None:
        if sub == 8:
            self.skip_strings(count)
        elif sub in _NP:
            self.numbers(sub, count)
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


def read_gguf(path: Path) -> GGUFInfo:
    """Metadata (vocabulary-sized arrays left out) and the tensor table of a GGUF file."""
    import gguf

    path = Path(path)
    try:
        with open(path, "rb") as f:
            size = f.seek(0, 2)
            if size < 24:
                raise ConvertError(f"{path} is not a readable GGUF file ({size} bytes)")
            mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    except OSError as e:
        raise ConvertError(f"{path} cannot be read ({e})") from None
    try:
        c = _Cursor(mm, path)
        if bytes(mm[:4]) != b"GGUF":
            raise ConvertError(f"{path} is not a GGUF file (no GGUF magic); pass a .gguf model file")
        c.pos = 4
        version = c.take("<I")
        if version < 2:
            raise ConvertError(f"{path} is GGUF v{version}; only v2 and later are read")
        n_tensors, n_kv = c.take("<Q"), c.take("<Q")
        meta: dict[str, Any] = {"GGUF.version": version, "GGUF.tensor_count": n_tensors, "GGUF.kv_count": n_kv}
        for _ in range(n_kv):
            key = c.string()
            vtype = c.take("<I")
            if key in BIG_ARRAYS and vtype == 9:
                sub, count = c.take("<I"), c.take("<Q")
                c.skip_array(sub, count)
                meta[f"{key}#len"] = count
            else:
                meta[key] = c.value(vtype)
        infos = []
        for _ in range(n_tensors):
            name = c.string()
            dims = tuple(c.take("<Q") for _ in range(c.take("<I")))
            ttype, offset = c.take("<I"), c.take("<Q")
            infos.append((name, dims, ttype, offset))
        align = int(meta.get("general.alignment", 32))
        start = -(-c.pos // align) * align
    finally:
        mm.close()
    tensors = []
    for name, dims, ttype, offset in infos:
        try:
            qt = gguf.GGMLQuantizationType(ttype)
            block, tsize = gguf.GGML_QUANT_SIZES[qt]
        except (ValueError, KeyError):
            raise ConvertError(f"{path}: tensor {name} has unknown type id {ttype}") from None
        n = int(np.prod(dims, dtype=np.int64)) if dims else 1
        n_bytes = n // block * tsize
        if start + offset + n_bytes > size:
            raise ConvertError(f"{path} ends inside tensor {name}: the file is truncated; re-download or re-export it")
        tensors.append(GGUFTensor(name, qt, dims, start + offset, n_bytes, path))
    return GGUFInfo(meta, tensors)
