"""Tiny random checkpoints (hidden 64, 2 layers) written as real HF directories, for end-to-end tests."""

from __future__ import annotations

import json
from pathlib import Path

import torch

ORIGINAL = 64  # the tiny models' pre-training window


def tiny_tokenizer(vocab_size: int = 512):
    """A byte-level BPE tokenizer trained on Python's own docs (offline, a second or two)."""
    from pydoc_data.topics import topics
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    texts = list(topics.values())[:200]
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   unk_token="<|endoftext|>", pad_token="<|endoftext|>")


def tiny_config(model_type: str, vocab_size: int = 512, max_pos: int = ORIGINAL, **extra):
    from transformers import LlamaConfig, MistralConfig, Qwen2Config

    cls = {"llama": LlamaConfig, "mistral": MistralConfig, "qwen2": Qwen2Config}[model_type]
    kw = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, vocab_size=vocab_size, max_position_embeddings=max_pos,
              bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=(model_type == "llama"))
    if model_type == "mistral":
        kw["sliding_window"] = None
    kw.update(extra)
    return cls(**kw)


def make_tiny(path: Path, model_type: str = "llama", sharded: bool = False, seed: int = 0,
              tokenizer=None, **config_extra) -> Path:
    """Write a random tiny model + tokenizer to ``path`` (sharded: several safetensors + index)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    tok = tokenizer or tiny_tokenizer()
    cfg = tiny_config(model_type, vocab_size=len(tok), **config_extra)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():  # random init is tiny; make the weights big enough that position matters
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.2)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(path), max_shard_size="60KB" if sharded else "10GB")
    tok.save_pretrained(str(path))
    if sharded:
        assert (path / "model.safetensors.index.json").exists()
    return path


def edit_config(path: Path, **changes) -> None:
    cfg = json.loads((path / "config.json").read_text())
    for k, v in changes.items():
        if v is None:
            cfg.pop(k, None)
        else:
            cfg[k] = v
    (path / "config.json").write_text(json.dumps(cfg, indent=2))
