"""transformers as a runtime: an extended HF directory loaded as users load it (``AutoModelForCausalLM``, no
custom code), its logits at any first position, greedy generation."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Sequence

import numpy as np

from convert.runtimes.base import Runtime, register_runtime

log = logging.getLogger(__name__)

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

    from convert.quiet import quiet_libraries

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


@register_runtime
class TransformersRuntime(Runtime):
    name = "transformers"
    formats = ("hf",)
    reads = ("config.json rope_scaling (4.x) or rope_parameters (5.x): rope_type / type, factor, long_factor, "
             "short_factor, original_max_position_embeddings, attention_factor, beta_fast, beta_slow, "
             "low_freq_factor, high_freq_factor", "rope_theta", "max_position_embeddings", "head_dim",
             "partial_rotary_factor")
    source = ("huggingface/transformers: src/transformers/modeling_rope_utils.py (ROPE_INIT_FUNCTIONS, "
              "dynamic_rope_update), src/transformers/models/<arch>/modeling_<arch>.py")

    def __init__(self, path: Path | None, model=None, device: str = "cpu"):
        super().__init__(path or Path("."))
        self.model = model if model is not None else load_hf(path, device)

    @classmethod
    def wrap(cls, model) -> "TransformersRuntime":
        """A model already loaded (by :func:`load_hf`, or changed in memory for a control)."""
        return cls(None, model=model)

    def logits(self, token_ids: Sequence[int], start_pos: int = 0) -> np.ndarray:
        return hf_logits(None, token_ids, model=self.model, start_pos=start_pos)

    def generate(self, token_ids: Sequence[int], max_new_tokens: int) -> list[int]:
        import torch

        ids = torch.tensor([list(map(int, token_ids))], device=self.model.device)
        with torch.no_grad():
            out = self.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=int(max_new_tokens),
                                      do_sample=False, pad_token_id=self.model.config.eos_token_id)
        return out[0, ids.shape[1]:].tolist()

    def close(self) -> None:
        self.model = None
