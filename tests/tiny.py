"""Tiny random checkpoints (hidden 64, 2 layers) written as real HF directories, for end-to-end tests."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

ORIGINAL = 64  # the tiny models' pre-training window


def tiny_tokenizer(family: str = "gpt-2", vocab_size: int = 512):
    """A small tokenizer of one of the families llama.cpp knows, trained on Python's own docs (a second or two).

    gpt-2, smollm, llama-bpe, qwen2: byte-level BPE with that family's pre-tokenizer; spm: a Llama-2 style
    (SentencePiece-like) BPE with byte fallback and the "▁" space marker.
    """
    from pydoc_data.topics import topics
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from convert.io.gguf_tokenizer import _LLAMA3_RE, _QWEN2_RE

    texts = list(topics.values())[:200]
    if family == "spm":
        tok = Tokenizer(models.BPE(byte_fallback=True, fuse_unk=True, unk_token="<unk>"))
        tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
        tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                         decoders.Strip(" ", 1, 0)])
        specials = ["<unk>", "<s>", "</s>"] + [f"<0x{i:02X}>" for i in range(256)]
        trainer = trainers.BpeTrainer(vocab_size=vocab_size + 256, special_tokens=specials, show_progress=False)
        tok.train_from_iterator(texts, trainer)
        return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                       pad_token="<unk>")
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=family in ("gpt-2", "smollm"))
    pre = {
        "gpt-2": byte_level,
        "smollm": pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level]),
        "llama-bpe": pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(_LLAMA3_RE), "isolated"), byte_level]),
        "qwen2": pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(_QWEN2_RE), "isolated"), byte_level]),
    }[family]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   unk_token="<|endoftext|>", pad_token="<|endoftext|>")


PHI3_ADDED = ("<|endoftext|>", "<|assistant|>", "<|system|>", "<|end|>", "<|user|>")  # Phi-3's own added tokens


def spm_tokenizer(dest: Path, vocab_size: int = 1000, added: tuple[str, ...] = PHI3_ADDED):
    """A real SentencePiece tokenizer.model, Llama-2 / Phi-3 style (BPE, byte fallback, digits split, "▁" prefix;
    <unk> <s> </s> = 0 1 2), trained on Python's own docs (a second or two) and written to ``dest/tokenizer.model``;
    returns the transformers tokenizer made from it, with ``added`` as special tokens after the SentencePiece
    vocabulary (Phi-3's chat tokens by default), so ``len()`` is the model's vocabulary.

    llama.cpp's converter reads the .model itself for Phi-3 (conversion/phi.py Phi3MiniModel.set_vocab; tokenizer.json
    and tokenizer_config.json only for the added tokens), and llama.cpp loads a model named phi3 only if its
    vocabulary has <|endoftext|> (src/llama-vocab.cpp, per-token attributes).  :func:`make_tiny` copies the .model
    next to the tokenizer it saves (transformers 5 writes only tokenizer.json)."""
    import io

    import sentencepiece as spm
    from pydoc_data.topics import topics
    from transformers import LlamaTokenizer

    lines = [line for text in topics.values() for line in text.splitlines() if line.strip()]
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=buf, vocab_size=vocab_size, model_type="bpe", byte_fallback=True,
        split_digits=True, allow_whitespace_only_pieces=True, remove_extra_whitespaces=False,
        normalization_rule_name="identity", add_dummy_prefix=True, character_coverage=1.0,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, num_threads=1, minloglevel=2)
    dest.mkdir(parents=True, exist_ok=True)
    (dest / "tokenizer.model").write_bytes(buf.getvalue())
    tok = LlamaTokenizer.from_pretrained(str(dest))  # transformers converts the .model (same pieces, same ids)
    tok.add_tokens(list(added), special_tokens=True)
    tok.pad_token = "<unk>"
    assert tok.vocab_file == str(dest / "tokenizer.model") and len(tok) == vocab_size + len(added)
    return tok


# every architecture of convert/arch.py, built from transformers' own config classes; "llama3" is a Llama with
# Llama 3.1's rope scaling (factor 2 over a 32-token original window here), "phi3" a Phi-3 with its own longrope
# factors (short and long, original window 32)
TINY_ARCHES = ("llama", "llama3", "mistral", "qwen2", "qwen3", "gemma3_text", "phi3")


def tiny_config(model_type: str, vocab_size: int = 512, max_pos: int = ORIGINAL, **extra):
    import transformers

    cls = {"llama": "LlamaConfig", "llama3": "LlamaConfig", "mistral": "MistralConfig", "qwen2": "Qwen2Config",
           "qwen3": "Qwen3Config", "gemma3_text": "Gemma3TextConfig", "phi3": "Phi3Config"}[model_type]
    kw = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, vocab_size=vocab_size, max_position_embeddings=max_pos,
              bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=(model_type == "llama"))
    if model_type == "mistral":
        kw["sliding_window"] = None
    if model_type == "llama3":
        kw["rope_scaling"] = {"rope_type": "llama3", "factor": 2.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                              "original_max_position_embeddings": max_pos // 2}
    if model_type == "qwen3":
        kw.update(head_dim=16, tie_word_embeddings=True)
    if model_type == "gemma3_text":  # Gemma 3's pattern: five sliding layers (window 16, their own base), one global
        kw.update(head_dim=16, num_hidden_layers=6, sliding_window=16, rope_theta=10000.0,
                  rope_local_base_freq=1000.0, query_pre_attn_scalar=16)
    if model_type == "phi3":
        n = 64 // 4 // 2
        kw.update(rope_scaling={"type": "longrope", "short_factor": [1.0 + 0.1 * i for i in range(n)],
                                "long_factor": [1.0 + 0.5 * i for i in range(n)]},
                  original_max_position_embeddings=max_pos // 2, pad_token_id=0)
    kw.update(extra)
    return getattr(transformers, cls)(**kw)


def make_tiny(path: Path, model_type: str = "llama", sharded: bool = False, seed: int = 0,
              tokenizer=None, **config_extra) -> Path:
    """Write a random tiny model + tokenizer to ``path`` (sharded: several safetensors + index); the vocabulary is
    the tokenizer's ``len()``, and a SentencePiece tokenizer's .model (:func:`spm_tokenizer`) goes along."""
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
    spm_model = getattr(tok, "vocab_file", None)  # a SentencePiece .model (spm_tokenizer): converters read it
    if spm_model and Path(spm_model).name == "tokenizer.model" and Path(spm_model).exists():
        shutil.copyfile(spm_model, path / "tokenizer.model")
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
