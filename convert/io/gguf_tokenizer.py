"""Tokenizer to GGUF: a Hugging Face tokenizer.json written as llama.cpp's ``tokenizer.ggml.*`` keys (byte-level BPE
with a pre-tokenizer type llama.cpp knows by name, or SentencePiece-style BPE), for the export stage
(``convert/formats/gguf_export.py``) and the GGUF sources (``convert/formats/checkpoint.py``).  Key names and pre-tokenizer types as
llama.cpp reads them (``src/llama-vocab.cpp``) and gguf-py writes them (``gguf/gguf_writer.py``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from convert.errors import ConvertError


# Pre-tokenizer regexes of the byte-level BPE families llama.cpp knows by name (llama-vocab.cpp).
_LLAMA3_RE = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
              r"\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_RE = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
             r"\s*[\r\n]+|\s+(?!\S)|\s+")
PRE_TOKENIZERS = {
    # name: the tokenizer.json "pre_tokenizer" that tokenises like llama.cpp's pre type of that name
    "gpt-2": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True},
    "smollm": {"type": "Sequence", "pretokenizers": [
        {"type": "Digits", "individual_digits": True},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}]},
    "llama-bpe": {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": _LLAMA3_RE}, "behavior": "Isolated", "invert": False},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}]},
    "qwen2": {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": _QWEN2_RE}, "behavior": "Isolated", "invert": False},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False}]},
}


def _pre_signature(pre: dict | None) -> Any:
    """What decides tokenisation in a pre_tokenizer block (flags like trim_offsets do not)."""
    if pre is None:
        return None
    t = pre.get("type")
    if t == "Sequence":
        return tuple(_pre_signature(p) for p in pre.get("pretokenizers", []))
    if t == "ByteLevel":
        return ("ByteLevel", bool(pre.get("use_regex", True)), bool(pre.get("add_prefix_space", False)))
    if t == "Digits":
        return ("Digits", bool(pre.get("individual_digits")))
    if t == "Split":
        pat = pre.get("pattern", {})
        return ("Split", pat.get("Regex", pat.get("String")), pre.get("behavior"))
    return (t,)


def detect_pre_tokenizer(tokenizer_json: dict) -> str:
    """llama.cpp's pre-tokenizer name for a byte-level BPE tokenizer.json; an unknown one is refused, because a
    wrong name silently tokenises differently in llama.cpp."""
    sig = _pre_signature(tokenizer_json.get("pre_tokenizer"))
    for name, pre in PRE_TOKENIZERS.items():
        if _pre_signature(pre) == sig:
            return name
    raise ConvertError(
        f"unknown pre-tokenizer {json.dumps(tokenizer_json.get('pre_tokenizer'))[:200]}; supported byte-level BPE "
        f"families: {', '.join(PRE_TOKENIZERS)} (and SentencePiece-style Llama-2/Mistral tokenizers)")


def _is_spm_style(tj: dict) -> bool:
    m = tj.get("model", {})
    return m.get("type") == "BPE" and bool(m.get("byte_fallback"))


def write_tokenizer(writer, ckpt: Path, n_vocab: int) -> str:
    """Tokens, types, merges, special ids and chat template; returns the tokenizer family written."""
    import gguf

    tj_path = ckpt / "tokenizer.json"
    if not tj_path.exists():
        raise ConvertError(f"{ckpt} has no tokenizer.json; a GGUF needs the tokenizer (copy it from the base model)")
    tj = json.loads(tj_path.read_text())
    if _is_spm_style(tj):
        tokens, scores, types = _spm_tokens(tj, n_vocab)
        writer.add_tokenizer_model("llama")
        writer.add_tokenizer_pre("default")
        writer.add_token_list(tokens)
        writer.add_token_scores(scores)
        writer.add_token_types(types)
        family = "llama (SentencePiece-style BPE with byte fallback)"
        load_merges = False
    else:
        if tj.get("model", {}).get("type") != "BPE":
            raise ConvertError(f"tokenizer model {tj.get('model', {}).get('type')} is not supported for GGUF export")
        pre = detect_pre_tokenizer(tj)
        vocab_map: dict[str, int] = tj["model"]["vocab"]
        added = {a["id"]: a for a in tj.get("added_tokens", [])}
        by_id = {i: t for t, i in vocab_map.items()}
        by_id.update({i: a["content"] for i, a in added.items()})
        tokens, types = [], []
        for i in range(n_vocab):
            if i not in by_id:
                tokens.append(f"[PAD{i}]")
                types.append(gguf.TokenType.UNUSED)
            elif i in added:
                tokens.append(added[i]["content"])
                types.append(gguf.TokenType.CONTROL if added[i].get("special") else gguf.TokenType.USER_DEFINED)
            else:
                tokens.append(by_id[i])
                types.append(gguf.TokenType.NORMAL)
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(pre)
        writer.add_token_list(tokens)
        writer.add_token_types(types)
        family = f"gpt2 BPE, pre-tokenizer {pre}"
        load_merges = True
    special = gguf.SpecialVocab(ckpt, load_merges=load_merges, n_vocab=n_vocab)
    special.add_to_gguf(writer, quiet=True)
    return family


def _spm_tokens(tj: dict, n_vocab: int) -> tuple[list[str], list[float], list]:
    """llama.cpp's SentencePiece tokenizer merges the adjacent pair whose joined piece scores highest; scoring each
    piece by minus the rank of the BPE merge that makes it reproduces the HF merge order."""
    import re

    import gguf

    vocab: dict[str, int] = tj["model"]["vocab"]
    merges = tj["model"].get("merges", [])
    rank: dict[str, int] = {}
    for r, m in enumerate(merges):
        a, b = m.split(" ", 1) if isinstance(m, str) else m
        rank.setdefault(a + b, r)
    added = {a["id"]: a for a in tj.get("added_tokens", [])}
    unk = tj["model"].get("unk_token")
    by_id = {i: t for t, i in vocab.items()}
    by_id.update({i: a["content"] for i, a in added.items()})
    if len(by_id) > n_vocab:
        raise ConvertError(f"tokenizer has {len(by_id)} tokens but the model's vocab_size is {n_vocab}")
    tokens, scores, types = [], [], []
    for i in range(n_vocab):
        text = by_id.get(i)
        if text is None:
            tokens.append(f"[PAD{i}]")
            scores.append(-1e9)
            types.append(gguf.TokenType.UNUSED)
            continue
        tokens.append(text)
        if re.fullmatch(r"<0x[0-9A-Fa-f]{2}>", text):
            types.append(gguf.TokenType.BYTE)
        elif text == unk:
            types.append(gguf.TokenType.UNKNOWN)
        elif i in added and added[i].get("special"):
            types.append(gguf.TokenType.CONTROL)
        elif i in added:
            types.append(gguf.TokenType.USER_DEFINED)
        else:
            types.append(gguf.TokenType.NORMAL)
        scores.append(-float(rank[text]) if text in rank else 0.0)
    return tokens, scores, types
