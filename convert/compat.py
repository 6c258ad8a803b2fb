"""The private APIs of dependencies the pipeline needs, each behind one small function.

Each reaches below a library's public API for a reason given in its docstring; tests/test_compat.py pins every one
to the installed version, which must be inside the bounds pyproject.toml gives (gguf, llama-cpp-python, lm-eval,
transformers; mlx-lm has no upper bound there yet), so an upgrade that changes them fails there, in one place,
rather than deep inside an export or a validation run.  No other module of
convert/ or bench/ imports a private module of a dependency or reads one of its underscore attributes
(tests/test_compat.py checks that too).  llama-cpp-python's low-level ctypes API (``llama_cpp.llama_*``, bound one to
one to llama.h) is public; convert/runtimes/llamacpp.py drives it, pinned by tests/test_llamacpp.py.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from convert.errors import ConvertError


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


# ------------------------------------------------------------------------------------------- llama-cpp-python
def llama_cpp_log_callback():
    """The log callback llama-cpp-python installs in llama.cpp when it is imported (llama_cpp/_logger.py:
    ``llama_log_callback``, set with ``llama_log_set`` at import), to put back after routing llama.cpp's log lines
    elsewhere for a while (convert.runtimes.llamacpp.native_logs)."""
    from llama_cpp import _logger

    return _logger.llama_log_callback


# ------------------------------------------------------------------------------------------- lm-eval
def lm_eval_load_module(path: Path):
    """A Python file of an lm-eval task folder, loaded the way lm-eval's task loader loads it (one module object per
    file, shared with the tasks that import it), so that patches on it reach the tasks
    (lm_eval/tasks/_yaml_loader.py: ``_load_module_with_cache``)."""
    from lm_eval.tasks._yaml_loader import _load_module_with_cache

    return _load_module_with_cache(Path(path).resolve())


def lm_eval_namespace(obj) -> dict:
    """The global namespace lm-eval's task code looks its helpers up in when it runs, as the live dict: an entry
    swapped there (and put back) changes what lm-eval's functions call.  For a module (one
    :func:`lm_eval_load_module` returns) its ``__dict__``: the dataset functions lm_eval/tasks/ruler/niah_utils.py,
    vt_utils.py, cwe_utils.py and fwe_utils.py name in their YAMLs call their sample generators, and read module
    state such as cwe_utils' ``RNG`` and ``WORDS``, through these globals.  For a function, the ``__globals__`` of the
    function under its decorators: niah_utils' ``generate_samples`` is lm_eval/tasks/ruler/prepare_niah.py's, which
    splits the haystack with that module's ``cached_sent_tokenize``."""
    import inspect
    import types

    if isinstance(obj, types.ModuleType):
        return obj.__dict__
    return inspect.unwrap(obj).__globals__


# ------------------------------------------------------------------------------------------- mlx-lm
def mlx_rope_frequencies(rope) -> tuple | None:
    """(frequencies, cos/sin multiplier) of an mlx-lm rotary module that keeps explicit frequencies, None for one
    that does not (mlx's plain ``nn.RoPE``, which has public ``dims``, ``base`` and ``scale``).  mlx-lm's
    SuScaledRoPE, Llama3RoPE and YarnRoPE (mlx_lm/models/rope_utils.py) keep the per-pair wavelength factors they
    pass to ``mx.fast.rope(freqs=...)`` in ``_freqs`` (the angle of pair i at position p is p / _freqs[i]), and
    SuScaledRoPE the multiplier it applies to q/k in ``_scale`` (YarnRoPE: public ``mscale``; else 1.0).  The
    multiplier is returned as found (it may be None)."""
    if not hasattr(rope, "_freqs"):
        return None
    return rope._freqs, getattr(rope, "_scale", getattr(rope, "mscale", 1.0))


# ------------------------------------------------------------------------------------------- transformers
def mark_dequantised(model) -> None:
    """A model transformers loaded from a GGUF file is flagged as quantized (``hf_quantizer``, ``is_quantized`` and
    ``config.quantization_config``) although its weights are plain float tensors; clear the flags so it saves as an
    ordinary checkpoint (transformers modeling_utils.py: PreTrainedModel.save_pretrained reads them)."""
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config


def kv_cache_of(output):
    """The KV cache a forward pass returned: ``output.cache`` where transformers has renamed it (5.x after 5.25:
    ``past_key_values`` is a deprecated alias that logs a warning, utils/generic.py ``ModelOutput``), else
    ``output.past_key_values`` (4.57)."""
    if "cache" in getattr(output, "__dataclass_fields__", {}):
        return output.cache
    return output.past_key_values


def kv_cache_kwargs(model, cache) -> dict:
    """The keyword a forward pass takes a KV cache by: ``cache`` where the model's forward accepts it (transformers
    5.x: ``past_key_values`` is deprecated, ``deprecate_kwarg(..., "5.40.0", new_name="cache")``), else
    ``past_key_values``."""
    import inspect

    params = inspect.signature(model.forward).parameters
    return {"cache": cache} if "cache" in params else {"past_key_values": cache}


def checkpointing_kwargs(enabled: bool) -> dict:
    """Activation checkpointing for ``TrainingArguments``: ``activation_checkpointing`` where it exists (transformers
    5.x; ``gradient_checkpointing`` is its deprecated alias there, training_args.py), else
    ``gradient_checkpointing``."""
    from dataclasses import fields

    from transformers import TrainingArguments

    names = {f.name for f in fields(TrainingArguments)}
    key = "activation_checkpointing" if "activation_checkpointing" in names else "gradient_checkpointing"
    return {key: bool(enabled)}


def attention_function_registered(name: str) -> bool:
    """Whether ``name`` is registered globally as a transformers attention function, so that registering is done
    once per process (transformers modeling_utils.py ``AttentionInterface`` / utils/generic.py
    ``GeneralInterface._global_mapping``, the dict ``AttentionInterface.register`` writes)."""
    from transformers import AttentionInterface

    return name in AttentionInterface._global_mapping


def attn_implementation(config) -> str | None:
    """The attention implementation a loaded model runs with, as ``PreTrainedModel.set_attn_implementation`` left it
    (transformers configuration_utils.py: the ``PretrainedConfig._attn_implementation`` property)."""
    return config._attn_implementation


def rotary_prefix(rot) -> str:
    """The attribute prefix of the scaled rotary tables: "" for one table (``inv_freq``, ``attention_scaling``), or
    "full_attention_" where a module keeps one table per layer type (Gemma 3 in transformers 5.x:
    ``full_attention_inv_freq``, ``sliding_attention_inv_freq``; models/gemma3/modeling_gemma3.py)."""
    return "full_attention_" if "full_attention" in (getattr(rot, "layer_types", None) or ()) else ""


def rotary_table(rot, layer_type: str | None = None):
    """(inv_freq, attention_scaling) a transformers rotary module uses for ``layer_type`` (None: the scaled one)."""
    p = f"{layer_type}_" if layer_type else rotary_prefix(rot)
    return getattr(rot, f"{p}inv_freq"), float(getattr(rot, f"{p}attention_scaling", 1.0))


def set_rotary_frequencies(rot, inv_freq, attention_scaling: float) -> None:
    """Make a transformers rotary embedding module (``LlamaRotaryEmbedding`` and kin) compute cos/sin from
    ``inv_freq`` times ``attention_scaling`` at every position, in place: its ``inv_freq`` buffer and
    ``attention_scaling``, which its forward reads, and the bookkeeping of ``dynamic_rope_update``
    (transformers modeling_rope_utils.py): ``original_inv_freq`` (restored inside the original window),
    ``rope_type`` "default" (no dynamic update at all) and the cached ``long_inv_freq`` dropped.  A module with one
    table per layer type has its scaled (full-attention) table set."""
    p = rotary_prefix(rot)
    buf = getattr(rot, f"{p}inv_freq")
    buf.copy_(inv_freq.to(buf.device, buf.dtype))
    orig = getattr(rot, f"{p}original_inv_freq", None)
    if isinstance(orig, type(buf)):
        orig.copy_(inv_freq.to(orig.device, orig.dtype))
    setattr(rot, f"{p}attention_scaling", attention_scaling)
    if p:
        rot.rope_type[p[:-1]] = "default"
    else:
        rot.rope_type = "default"
    if hasattr(rot, f"{p}long_inv_freq"):
        delattr(rot, f"{p}long_inv_freq")


@contextlib.contextmanager
def rotary_frequencies_replaced(rot, inv_freq) -> Iterator:
    """For the duration of the block a transformers rotary embedding module rotates by ``inv_freq`` (a float tensor
    [n_pairs]), and afterwards as before: its ``inv_freq`` buffer and the ``original_inv_freq`` / cached
    ``long_inv_freq`` that ``dynamic_rope_update`` (transformers modeling_rope_utils.py) switches between by sequence
    length are replaced, then put back.  A longrope module that has not yet run past its original window has no
    cached ``long_inv_freq``, and computes its own there.  A module with one table per layer type has its scaled
    (full-attention) table replaced."""
    p = rotary_prefix(rot)
    names = (f"{p}inv_freq", f"{p}original_inv_freq", f"{p}long_inv_freq")
    saved = (getattr(rot, names[0]).clone(), getattr(rot, names[1], None), getattr(rot, names[2], None))
    try:
        setattr(rot, names[0], inv_freq.clone())
        setattr(rot, names[1], inv_freq.clone())
        if saved[2] is not None:
            setattr(rot, names[2], inv_freq.clone())
        yield rot
    finally:
        setattr(rot, names[0], saved[0])
        if saved[1] is not None:
            setattr(rot, names[1], saved[1])
        if saved[2] is not None:
            setattr(rot, names[2], saved[2])

@contextlib.contextmanager
def rotary_computed_from(rot, inv_freq, attention_scaling, other_position_ids=None) -> Iterator:
    """For the duration of the block a transformers rotary embedding module returns cos/sin computed from the given
    tensors, differentiably: ``inv_freq`` (float [n_pairs]) and ``attention_scaling`` (a number or a 0-d tensor) may
    require grad, and the model's loss then reaches them through every attention layer.  The module's own forward
    reads its ``inv_freq`` buffer through ``dynamic_rope_update`` (and, in transformers 4.x, under
    ``torch.no_grad``), so no gradient leaves it; this replaces the instance's ``forward`` with the computation of
    ``LlamaRotaryEmbedding.forward`` (transformers models/llama/modeling_llama.py: angles position x inv_freq in
    float32, the pair halves concatenated, cos and sin times the scaling, cast to the input's dtype), the layout
    every decoder's ``apply_rotary_pos_emb`` reads, and puts the class's forward back afterwards.  A module with one
    table per layer type (Gemma 3) computes its scaled (full-attention) table so and the others as before, at
    ``other_position_ids`` where given: a short window with skipped position ids (PoSE) gives the sliding-window
    layers the window's own contiguous positions, since transformers masks their window by token index
    (masking_utils.py ``sliding_window_overlay``), and on the long text a window stands for they read the last
    tokens at their true, contiguous distances; only the global layers' positions skip."""
    import torch

    p = rotary_prefix(rot)
    scaled = p[:-1] if p else None
    own = rot.forward

    def forward(x, position_ids, *args, **kwargs):
        layer_type = args[0] if args else kwargs.get("layer_type")
        if scaled is not None and layer_type is not None and layer_type != scaled:
            if other_position_ids is not None:
                position_ids = other_position_ids.to(position_ids.device)
            return own(x, position_ids, *args, **kwargs)
        freqs = position_ids[..., None].float() * inv_freq.to(device=x.device, dtype=torch.float)
        emb = torch.cat((freqs, freqs), dim=-1)
        cos = emb.cos() * attention_scaling
        sin = emb.sin() * attention_scaling
        return cos.to(dtype=x.dtype), sin.to(dtype=x.dtype)

    rot.forward = forward
    try:
        yield rot
    finally:
        del rot.forward
