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


def _locked(fn, *args):
    """``fn(*args)`` under one lock file beside the sdist's files, so pytest-xdist's workers fetch them once."""
    import fcntl

    from _measure import DATA

    DATA.mkdir(parents=True, exist_ok=True)
    with open(DATA / ".llama-cpp-sdist.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        return fn(*args)


def convert(hf_dir: Path, out: Path, outtype: str = "f32") -> Path:
    """``hf_dir`` -> ``out`` with llama.cpp's converter (its own gguf-py first on the path)."""
    script = _locked(peer_converter)
    env = {**os.environ, "PYTHONPATH": str(script.parent / "gguf-py"), "NO_LOCAL_GGUF": ""}
    p = subprocess.run([sys.executable, str(script), str(hf_dir), "--outfile", str(out), "--outtype", outtype],
                       capture_output=True, text=True, env=env)
    if p.returncode != 0:
        raise RuntimeError(f"convert_hf_to_gguf.py failed on {hf_dir}:\n{p.stderr[-3000:]}")
    return out


# one interpreter runs the converter's main() once per model (its own argv each): the converter's imports (torch,
# transformers, its gguf-py) cost far more than converting a tiny model
_MANY = r"""
import os, runpy, sys
script, outtype, pairs = sys.argv[1], sys.argv[2], sys.argv[3:]
sys.path.insert(0, os.path.dirname(script))  # as `python script.py` would: its conversion/ package beside it
mod = runpy.run_path(script)  # defines the model classes once; not as __main__, so nothing runs yet
for hf_dir, out in zip(pairs[::2], pairs[1::2]):
    sys.argv = [script, hf_dir, "--outfile", out, "--outtype", outtype]
    mod["main"]()
"""


def convert_many(jobs: list[tuple[Path, Path]], outtype: str = "f32") -> list[Path]:
    """Each (hf_dir, out) of ``jobs`` converted as :func:`convert` does, all in one child process."""
    if not jobs:
        return []
    script = _locked(peer_converter)
    env = {**os.environ, "PYTHONPATH": str(script.parent / "gguf-py"), "NO_LOCAL_GGUF": ""}
    args = [str(x) for pair in jobs for x in pair]
    p = subprocess.run([sys.executable, "-c", _MANY, str(script), outtype, *args], capture_output=True, text=True,
                       env=env)
    if p.returncode != 0:
        raise RuntimeError(f"convert_hf_to_gguf.py failed on one of {[str(j[0]) for j in jobs]}:\n"
                           f"{p.stderr[-3000:]}")
    missing = [str(out) for _, out in jobs if not Path(out).is_file()]
    if missing:
        raise RuntimeError(f"convert_hf_to_gguf.py wrote no {', '.join(missing)}:\n{p.stderr[-3000:]}")
    return [Path(out) for _, out in jobs]


def llamacpp_vocab(name: str) -> Path:
    """llama.cpp's own vocabulary-only GGUF of a model family (``models/ggml-vocab-<name>.gguf``: the real tokenizer,
    no weights, that its tokenizer tests load), from the same llama-cpp-python sdist as the converter; unpacked once
    next to it (bench/.data/llama-cpp-python-<version>/vendor/llama.cpp/models/)."""
    vendor = _locked(peer_converter).parent
    dest = vendor / "models" / f"ggml-vocab-{name}.gguf"

    def fetch():
        if not dest.exists():
            llama_cpp_sdist_files(vendor.parent.parent, (f"vendor/llama.cpp/models/{dest.name}",))

    _locked(fetch)
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
