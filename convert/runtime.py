"""Run outputs in the runtimes users have: transformers for HF directories, llama.cpp (llama-cpp-python) for GGUF.

These are the functions tests and `dprope verify` use to compare logits across runtimes.
"""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from .errors import ConvertError

log = logging.getLogger(__name__)

GGML_TYPE_F32 = 0


def _llama_cpp():
    from .llamacpp import import_llama_cpp

    return import_llama_cpp()


@contextlib.contextmanager
def open_gguf(path: Path, n_ctx: int, *, logits_all: bool = True, f32_kv: bool = True,
              vocab_only: bool = False) -> Iterator:
    """A llama.cpp model with an F32 KV cache (so parity is not limited by cache rounding), closed on exit."""
    llama_cpp = _llama_cpp()
    kw = dict(n_ctx=n_ctx, logits_all=logits_all, verbose=False, vocab_only=vocab_only,
              n_threads=max(1, os.cpu_count() or 1), n_batch=min(n_ctx, 512))
    if f32_kv:
        kw.update(type_k=GGML_TYPE_F32, type_v=GGML_TYPE_F32)
    try:
        llm = llama_cpp.Llama(str(path), **kw)
    except ValueError as e:
        raise ConvertError(f"llama.cpp could not load {path}: {e}") from None
    try:
        yield llm
    finally:
        llm.close()


def llama_cpp_tokenize(path: Path, text: str) -> list[int]:
    """Token ids without BOS; special tokens written in the text are parsed as such, as transformers does."""
    with open_gguf(path, 64, logits_all=False, vocab_only=True) as llm:
        return llm.tokenize(text.encode("utf-8"), add_bos=False, special=True)


def llama_cpp_logits(path: Path, token_ids: Sequence[int], n_ctx: int, start_pos: int = 0
                     ) -> tuple[np.ndarray, int]:
    """Logits [n_tokens, vocab] (float32) for one sequence placed at positions start_pos.., and the context
    llama.cpp actually allocated.  A start past the original window checks rotations at large positions without
    paying for a prefix (llama.cpp accepts any first position on an empty cache)."""
    from .llamacpp import Decoder

    ids = list(map(int, token_ids))
    with open_gguf(path, n_ctx, logits_all=False) as llm:
        d = Decoder(llm)
        try:
            rows = [r.copy() for _, r in d.decode(ids, start_pos)]
        finally:
            d.close()
        return np.concatenate(rows).astype(np.float32), int(llm.n_ctx())


def eval_device() -> str:
    """Where evaluations run: ``$DPROPE_DEVICE`` if set, else the GPU when torch sees one, else the CPU."""
    import os

    import torch

    return os.environ.get("DPROPE_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu")


def load_hf(ckpt: Path, device: str = "cpu"):
    """A transformers model in eval mode on ``device``: float32 on the CPU (parity checks keep that default), bfloat16
    on a GPU (``$DPROPE_EVAL_DTYPE`` overrides).  On a GPU, float32 SDPA with grouped KV heads has no fused kernel in
    PyTorch (flash attention is 16-bit only; the memory-efficient kernel takes no ``enable_gqa``), so it falls back to
    materialising the full attention matrix: 36 GiB per layer at 32k tokens."""
    import os

    import torch
    from transformers import AutoModelForCausalLM

    from .quiet import quiet_libraries

    default = "float32" if str(device) == "cpu" else "bfloat16"
    dtype = getattr(torch, os.environ.get("DPROPE_EVAL_DTYPE") or default)
    with quiet_libraries():  # its loading bar and notes on config keys it does not use (short_mscale, long_mscale)
        return AutoModelForCausalLM.from_pretrained(str(ckpt), dtype=dtype).eval().to(device)


def hf_logits(ckpt: Path | None, token_ids: Sequence[int], model=None, start_pos: int = 0) -> np.ndarray:
    """Logits [n_tokens, vocab] (float32) from transformers on a HF directory (or an already loaded model)."""
    import torch

    model = model or load_hf(ckpt)
    ids = torch.tensor([list(map(int, token_ids))])
    pos = torch.arange(start_pos, start_pos + ids.shape[1]).unsqueeze(0)
    with torch.no_grad():
        return model(ids, position_ids=pos).logits[0].float().numpy()


def max_abs_diff(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.float64) - b.astype(np.float64)).max())


def mean_kl(ref_logits: np.ndarray, logits: np.ndarray) -> float:
    """Mean over positions of KL(softmax(ref) || softmax(logits)), nats."""
    r = ref_logits.astype(np.float64)
    q = logits.astype(np.float64)
    lr = r - np.logaddexp.reduce(r, axis=-1, keepdims=True)
    lq = q - np.logaddexp.reduce(q, axis=-1, keepdims=True)
    return float((np.exp(lr) * (lr - lq)).sum(-1).mean())
