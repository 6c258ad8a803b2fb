"""One small interface over the runtimes an output is run in: transformers, llama.cpp, MLX-lm and DPE's attention.

A :class:`Runtime` loads one output (a HF directory or a GGUF file), gives the logits of a token sequence placed at
any first position (so rotations past the original window are checked without paying for a prefix), generates
greedily, and says which keys of the output it reads for RoPE (``reads``, each from that runtime's source).  Like
lm-eval's ``LM`` base class (lm_eval/api/model.py), the interface is what lets ``dprope verify`` and the tests compare
any two runtimes the same way; each runtime registers itself under a name (``open_runtime("llama.cpp", path)``).

Runtimes that are not installable here (vLLM, SGLang, ExLlamaV2: CUDA only) are modelled by how they read
config.json, in :mod:`convert.runtimes.readers`.
"""

from __future__ import annotations

import abc
import importlib
from pathlib import Path
from typing import Callable, ClassVar, Sequence

import numpy as np

from convert.errors import ConvertError

RUNTIMES: dict[str, type["Runtime"]] = {}


def register_runtime(cls: type["Runtime"]) -> type["Runtime"]:
    """Class decorator: make ``cls`` available to :func:`open_runtime` under ``cls.name``."""
    if cls.name in RUNTIMES:
        raise ConvertError(f"runtime '{cls.name}' is already registered")
    RUNTIMES[cls.name] = cls
    return cls


# the runtimes of this package, by the module that registers each (imported when first asked for, so that
# reading one runtime's settings never imports another's library)
BUILTIN = {"transformers": "convert.runtimes.hf", "llama.cpp": "convert.runtimes.llamacpp",
           "mlx": "convert.runtimes.mlx", "dpe": "convert.runtimes.dpe"}


def get_runtime(name: str) -> type["Runtime"]:
    if name not in RUNTIMES and name in BUILTIN:
        importlib.import_module(BUILTIN[name])
    try:
        return RUNTIMES[name]
    except KeyError:
        raise ConvertError(f"unknown runtime '{name}'; available: {', '.join(sorted(set(RUNTIMES) | set(BUILTIN)))}"
                           ) from None


def open_runtime(name: str, path: Path, **options) -> "Runtime":
    """The output at ``path`` loaded in runtime ``name``; use it as a context manager so it is freed on exit."""
    cls = get_runtime(name)
    path = Path(path)
    fmt = "gguf" if path.suffix == ".gguf" else "hf"
    if fmt not in cls.formats:
        raise ConvertError(f"{cls.name} runs {' or '.join(cls.formats)} outputs, not {path} ({fmt})")
    return cls(path, **options)


class Runtime(abc.ABC):
    """An output loaded in one runtime."""

    name: ClassVar[str]
    formats: ClassVar[tuple[str, ...]]  # "hf" (a checkpoint directory) and/or "gguf"
    reads: ClassVar[tuple[str, ...]]  # the RoPE keys (and tensors) of the output this runtime reads
    source: ClassVar[str]  # where ``reads`` comes from

    def __init__(self, path: Path):
        self.path = Path(path)

    @abc.abstractmethod
    def logits(self, token_ids: Sequence[int], start_pos: int = 0) -> np.ndarray:
        """Logits [n_tokens, vocab] float32 of one sequence at positions start_pos .. start_pos + n - 1."""

    @abc.abstractmethod
    def generate(self, token_ids: Sequence[int], max_new_tokens: int) -> list[int]:
        """Greedy continuation of ``token_ids`` (at positions 0..), stopping at an end-of-generation token."""

    # tokens this runtime has run through the model for generate_after (prompts, suffixes, generated tokens)
    tokens_processed: int = 0

    def generate_after(self, prefix: Sequence[int], suffixes: Sequence[Sequence[int]], max_new_tokens: int,
                       stop: Callable[[list[int]], bool] | None = None) -> list[list[int]]:
        """Greedy continuation of ``prefix + suffix`` for each suffix (many questions about one long document),
        each at most ``max_new_tokens`` tokens, ending before an end-of-generation token or once ``stop(tokens)`` is
        true.  A runtime with a KV cache decodes the prefix once and reuses it for every suffix (transformers: the
        prefill's cache, cut back after each question; llama.cpp: the context's memory); this default runs every
        whole prompt, as separate prompts would.  ``tokens_processed`` grows by the tokens run through the model."""
        outs = []
        for s in suffixes:
            prompt = [*map(int, prefix), *map(int, s)]
            out = list(self.generate(prompt, max_new_tokens))
            cut = next((i + 1 for i in range(len(out)) if stop is not None and stop(out[: i + 1])), len(out))
            outs.append(out[:cut])
            self.tokens_processed += len(prompt) + max(0, len(out) - 1)
        return outs

    def close(self) -> None:
        """Free the model now rather than at garbage collection."""

    def __enter__(self) -> "Runtime":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def max_abs_diff(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.float64) - b.astype(np.float64)).max())


def mean_kl(ref_logits: np.ndarray, logits: np.ndarray) -> float:
    """Mean over positions of KL(softmax(ref) || softmax(logits)), nats."""
    r = ref_logits.astype(np.float64)
    q = logits.astype(np.float64)
    lr = r - np.logaddexp.reduce(r, axis=-1, keepdims=True)
    lq = q - np.logaddexp.reduce(q, axis=-1, keepdims=True)
    return float((np.exp(lr) * (lr - lq)).sum(-1).mean())
