"""llama.cpp's own converter (convert_hf_to_gguf.py, vendored in the llama-cpp-python sdist), to make GGUFs of tiny
models exactly as users' GGUFs are made.  Fetched once from PyPI (the sdist of the installed llama-cpp-python) by the
GGUF export benchmark's own helper (bench/gguf_vs_llamacpp.py ``peer_converter``, cached under bench/.data).  The
converter names a byte-level BPE tokenizer's pre-tokenizer by hashing the token ids it gives a fixed text
(conversion/base.py ``get_vocab_base_pre``), so only a known model's own vocabulary passes: the tiny models get
SmolLM2's ("smollm"), and Qwen2's get Qwen2's real one (``llamacpp_vocab("qwen2")``; see ``qwen2_tokenizer``)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from gguf_vs_llamacpp import llama_cpp_sdist_files, peer_converter  # bench/ is on sys.path (tests/conftest.py)


def convert(hf_dir: Path, out: Path, outtype: str = "f32") -> Path:
    """``hf_dir`` -> ``out`` with llama.cpp's converter (its own gguf-py first on the path)."""
    script = peer_converter()
    env = {**os.environ, "PYTHONPATH": str(script.parent / "gguf-py"), "NO_LOCAL_GGUF": ""}
    p = subprocess.run([sys.executable, str(script), str(hf_dir), "--outfile", str(out), "--outtype", outtype],
                       capture_output=True, text=True, env=env)
    if p.returncode != 0:
        raise RuntimeError(f"convert_hf_to_gguf.py failed on {hf_dir}:\n{p.stderr[-3000:]}")
    return out


def llamacpp_vocab(name: str) -> Path:
    """llama.cpp's own vocabulary-only GGUF of a model family (``models/ggml-vocab-<name>.gguf``: the real tokenizer,
    no weights, that its tokenizer tests load), from the same llama-cpp-python sdist as the converter; unpacked once
    next to it (bench/.data/llama-cpp-python-<version>/vendor/llama.cpp/models/)."""
    vendor = peer_converter().parent
    dest = vendor / "models" / f"ggml-vocab-{name}.gguf"
    if not dest.exists():
        llama_cpp_sdist_files(vendor.parent.parent, (f"vendor/llama.cpp/models/{dest.name}",))
    return dest


def qwen2_tokenizer():
    """Qwen2's real tokenizer (151,936 ids with the converter's padding), rebuilt by transformers from llama.cpp's
    ggml-vocab-qwen2.gguf.  transformers 5 loads any tokenizer of a ``model_type: qwen2`` directory as its
    Qwen2Tokenizer, whose pre-tokenizer is Qwen2's whatever tokenizer.json says (models/auto/tokenization_auto.py
    ``MODELS_WITH_INCORRECT_HUB_TOKENIZER_CLASS``), and the converter (conversion/qwen.py ``Qwen2Model.set_vocab`` ->
    base.py ``_set_vocab_gpt2`` -> ``get_vocab_base_pre``) then knows the ids only of Qwen2's own vocabulary
    ("qwen2"); SmolLM2's, or any small trained one, hashes to nothing it knows."""
    from transformers import AutoTokenizer

    from convert.formats.checkpoint import gguf_tokenizer_dir

    return AutoTokenizer.from_pretrained(str(gguf_tokenizer_dir(llamacpp_vocab("qwen2"))))
