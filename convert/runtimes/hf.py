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


def _eos_ids(model) -> set[int]:
    """The end-of-generation ids of a model (its generation config's, else its config's)."""
    ids = set()
    for cfg in (getattr(model, "generation_config", None), model.config):
        e = getattr(cfg, "eos_token_id", None) if cfg is not None else None
        ids |= {int(x) for x in (e if isinstance(e, (list, tuple)) else [e]) if x is not None}
    return ids


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

    def generate_after(self, prefix: Sequence[int], suffixes: Sequence[Sequence[int]], max_new_tokens: int,
                       stop=None) -> list[list[int]]:
        """The prefix is prefilled once (the decoder alone: no logits for its positions), and every suffix and its
        answer run on its KV cache (``past_key_values``, ``cache`` in transformers 5.25: ``convert.compat``): after each question the cache is cropped back to the
        prefix (``DynamicCache.crop`` with a negative count, which transformers 4.57 and 5.x both read as tokens to
        remove), or, where a layer keeps only a sliding window (Gemma 3's local layers, which cannot be cropped
        back past their window), each question starts from a copy of the prefill's cache.  Only the last position's
        logits are computed per step (``logits_to_keep=1``)."""
        import copy

        import torch

        from convert.compat import kv_cache_kwargs, kv_cache_of

        model = self.model
        eos = _eos_ids(model)
        dev = model.device
        prefix = [int(t) for t in prefix]
        outs: list[list[int]] = []
        with torch.no_grad():
            decoder = getattr(model, model.base_model_prefix)
            cache = kv_cache_of(decoder(input_ids=torch.tensor([prefix], device=dev), use_cache=True))
            self.tokens_processed += len(prefix)
            sliding = any(getattr(cache, "is_sliding", None) or ()) or any(
                "sliding" in str(t) for t in (getattr(model.config, "layer_types", None) or ()))
            for s in suffixes:
                c = copy.deepcopy(cache) if sliding else cache
                extra = c.get_seq_length() - len(prefix)
                if extra > 0:
                    c.crop(-extra)  # negative: the number of tokens to remove (the last question and answer)
                ids = [int(t) for t in s]
                out: list[int] = []
                while True:
                    logits = model(input_ids=torch.tensor([ids], device=dev), use_cache=True, logits_to_keep=1,
                                   **kv_cache_kwargs(model, c)).logits
                    self.tokens_processed += len(ids)
                    nxt = int(logits[0, -1].argmax())
                    if nxt in eos:
                        break
                    out.append(nxt)
                    if len(out) >= int(max_new_tokens) or (stop is not None and stop(out)):
                        break
                    ids = [nxt]
                outs.append(out)
        return outs

    def close(self) -> None:
        self.model = None
