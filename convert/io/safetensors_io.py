"""Reading safetensors checkpoints without loading them: file names and the header of each file, checked against the
file's size.  Format: https://github.com/huggingface/safetensors#format (u64 little-endian header size, JSON header,
tensor data at the header's offsets)."""

from __future__ import annotations

import json
import struct
from pathlib import Path

from convert.errors import ConvertError
from convert.names import INDEX_NAME, SINGLE_NAME  # noqa: F401


def safetensors_header(path: Path) -> dict:
    """The JSON header of a safetensors file, after checking the file holds every byte the header promises."""
    return safetensors_layout(path)[0]


def safetensors_layout(path: Path) -> tuple[dict, int]:
    """(JSON header, offset of the data region in the file): a tensor's bytes are at offset + its data_offsets.
    The file is checked to hold every byte the header promises."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise ConvertError(f"{path} is truncated ({size} bytes): re-download or re-copy the shard")
            (n,) = struct.unpack("<Q", head)
            if 8 + n > size:
                raise ConvertError(
                    f"{path} is truncated or not safetensors (header wants {n} bytes, file has {size}): "
                    "re-download or re-copy the shard")
            header = json.loads(f.read(n))
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise ConvertError(f"{path} has a corrupt safetensors header: re-download or re-copy the shard") from None
    end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
    if 8 + n + end > size:
        raise ConvertError(
            f"{path} is truncated: its tensors need {8 + n + end} bytes but the file has {size}; "
            "re-download or re-copy the shard")
    return header, 8 + n
