"""One interface over the runtimes (convert/runtimes/base.py): every runtime loads the same extended model and gives
the same logits at positions past the original window, and greedy generation agrees across runtimes."""

from pathlib import Path

import numpy as np
import pytest

from convert.errors import ConvertError
from convert.formats.checkpoint import open_source
from convert.formats.gguf_export import export_gguf
from convert.runtimes.base import BUILTIN, get_runtime, max_abs_diff, mean_kl, open_runtime
from convert.runtimes.mlx import mlx_version
from convert.stages.bake import bake, make_plan
from tiny import ORIGINAL

TARGET = 4 * ORIGINAL


@pytest.fixture(scope="module")
def extended(tiny_models, tmp_path_factory) -> tuple[Path, Path]:
    """(HF directory, its f32 GGUF) of a tiny Llama extended 4x with YaRN's factors and temperature."""
    root = tmp_path_factory.mktemp("interface")
    hf = bake(open_source(tiny_models[("llama", False)]), root / "hf", make_plan("yarn", TARGET), progress=False)
    gg = root / "ext-f32.gguf"
    export_gguf(hf, gg, "f32", progress=False)
    return hf, gg


def _ids(n: int) -> list[int]:
    return np.random.default_rng(1).integers(3, 200, n).tolist()


def test_every_builtin_runtime_registers_itself_with_what_it_reads():
    for name in BUILTIN:
        cls = get_runtime(name)
        assert cls.name == name and cls.formats and cls.reads and cls.source


def test_unknown_runtime_and_wrong_format_are_refused(extended):
    hf, gg = extended
    with pytest.raises(ConvertError, match="unknown runtime 'vllm'; available: dpe, llama.cpp, mlx, transformers"):
        open_runtime("vllm", hf)
    with pytest.raises(ConvertError, match="llama.cpp runs gguf outputs"):
        open_runtime("llama.cpp", hf)
    with pytest.raises(ConvertError, match="transformers runs hf outputs"):
        open_runtime("transformers", gg)


@pytest.mark.runtime
def test_transformers_and_llama_cpp_agree_past_the_window(extended, tiny_models):
    hf, gg = extended
    ids = _ids(ORIGINAL + 48)  # one sequence from position 0 across the original window
    with open_runtime("transformers", hf) as a, open_runtime("llama.cpp", gg, n_ctx=TARGET) as b:
        ref, got = a.logits(ids), b.logits(ids)
        assert ref.shape == got.shape == (len(ids), ref.shape[1])
        assert max_abs_diff(ref, got) < 1e-3 and mean_kl(ref, got) < 1e-6
        prompt = _ids(20)
        assert a.generate(prompt, 6) == b.generate(prompt, 6)
    # the factors take effect: the base (plain RoPE) gives other logits on the same tokens
    with open_runtime("transformers", tiny_models[("llama", False)]) as base:
        assert max_abs_diff(ref, base.logits(ids)) > 1e-2


@pytest.mark.runtime
def test_dpe_runtime_with_unit_scales_is_the_model_itself(extended):
    from convert.runtimes.dpe import DPEBackend

    hf, _ = extended
    ids = _ids(40)
    with open_runtime("transformers", hf) as a:
        ref = a.logits(ids)
    n_pairs = open_source(hf).spec.head_dim // 2
    with open_runtime("dpe", hf, backend=DPEBackend((0, n_pairs), (1.0,), 16)) as d:
        assert max_abs_diff(ref, d.logits(ids)) < 1e-4


@pytest.mark.mlx
@pytest.mark.skipif(mlx_version() is None, reason="mlx-lm is not installed (make setup installs it)")
def test_mlx_runtime_generates_like_transformers(tiny_models, tmp_path):
    # the default method carries LongRoPE's temperature, the one MLX-lm applies to a longrope config on its own
    hf = bake(open_source(tiny_models[("llama", False)]), tmp_path / "hf", make_plan("dprope", TARGET), progress=False)
    ids = _ids(24)
    with open_runtime("transformers", hf) as a, open_runtime("mlx", hf) as m:
        assert max_abs_diff(a.logits(ids, TARGET - 32), m.logits(ids, TARGET - 32)) < 1e-2
        assert a.generate(ids, 5) == m.generate(ids, 5)
