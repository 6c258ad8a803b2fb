"""The private APIs of dependencies the pipeline needs, each behind one small function.

Each reaches below a library's public API for a reason given in its docstring; tests/test_compat.py pins every one
to the versions pyproject.toml allows (gguf, lm-eval, transformers; llama-cpp-python's has its own module,
convert/llamacpp.py, pinned by tests/test_llamacpp.py), so an upgrade that changes
them fails there, in one place, rather than deep inside an export or a validation run.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

import numpy as np

from .errors import ConvertError


# ------------------------------------------------------------------------------------------- gguf-py
def gguf_write_tensor_blocks(writer, data: Iterable[np.ndarray], nbytes: int) -> None:
    """gguf-py's ``GGUFWriter.write_tensor_data`` for a tensor whose data arrive in row blocks (so a tensor is never
    whole in memory): the same alignment padding and the same writer bookkeeping.  Reaches into the writer's
    ``fout``, ``tensors``, ``write_padding`` and ``state`` (gguf-py gguf_writer.py: write_tensor_data).

    Blocks go through the file object's write, not numpy's ``tofile`` (which gguf-py uses): ``tofile`` reports a
    full disk as an OSError without an errno ("N requested and M written"), write reports ENOSPC / EFBIG."""
    from gguf.gguf_writer import WriterState

    if writer.state not in (WriterState.TI_DATA, WriterState.WEIGHTS):
        raise ConvertError(f"GGUF tensor data written out of order: the writer expected tensor info or weights "
                           f"first, it is at {writer.state}")
    fout = writer.fout[0]
    name = next(iter(writer.tensors[0]))
    ti = writer.tensors[0].pop(name)
    if ti.nbytes != nbytes:
        raise ConvertError(f"internal size mismatch for {name}: {ti.nbytes} != {nbytes}")
    writer.write_padding(fout, fout.tell())
    written = 0
    for block in data:
        fout.write(memoryview(np.ascontiguousarray(block)).cast("B"))
        written += block.nbytes
    if written != nbytes:
        raise ConvertError(f"{name}: wrote {written} of {nbytes} bytes")
    writer.write_padding(fout, nbytes)
    writer.state = WriterState.WEIGHTS


# ------------------------------------------------------------------------------------------- lm-eval
def lm_eval_load_module(path: Path):
    """A Python file of an lm-eval task folder, loaded the way lm-eval's task loader loads it (one module object per
    file, shared with the tasks that import it), so that patches on it reach the tasks
    (lm_eval/tasks/_yaml_loader.py: ``_load_module_with_cache``)."""
    from lm_eval.tasks._yaml_loader import _load_module_with_cache

    return _load_module_with_cache(Path(path).resolve())


# ------------------------------------------------------------------------------------------- transformers
def mark_dequantised(model) -> None:
    """A model transformers loaded from a GGUF file is flagged as quantized (``hf_quantizer``, ``is_quantized`` and
    ``config.quantization_config``) although its weights are plain float tensors; clear the flags so it saves as an
    ordinary checkpoint (transformers modeling_utils.py: PreTrainedModel.save_pretrained reads them)."""
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
