"""Reading safetensors checkpoints without loading them: file names and the header of each file, checked against the
file's size.  Format: https://github.com/huggingface/safetensors#format (u64 little-endian header size, JSON header,
tensor data at the header's offsets)."""

from __future__ import annotations

import json
import struct
from pathlib import Path

from .errors import ConvertError

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"


def safetensors_header(path: Path) -> dict:
    """The JSON header of a safetensors file, after checking the file holds every byte the header promises."""
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
    return header
