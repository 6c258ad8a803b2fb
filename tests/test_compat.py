"""The adapters over dependencies' private APIs (convert/compat.py), pinned to the versions pyproject.toml allows, and
the code's shape: one list per concept, no import circle between the pipeline's modules."""

import ast
import json
import sys
from importlib import metadata
from pathlib import Path

import numpy as np
import pytest

from convert import compat

ROOT = Path(__file__).resolve().parent.parent
# the dependencies whose private APIs convert/compat.py uses (distribution names as pip knows them)
PINNED = ("gguf", "llama-cpp-python", "lm-eval", "transformers", "accelerate", "torch", "mlx-lm")


def _requirements() -> dict:
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    from packaging.requirements import Requirement

    p = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = list(p["dependencies"]) + [r for extra in p["optional-dependencies"].values() for r in extra]
    out = {}
    for r in map(Requirement, reqs):
        out.setdefault(r.name.lower().replace("_", "-"), r)
    return out


@pytest.mark.parametrize("name", PINNED)
def test_installed_versions_are_inside_the_bounds_the_adapters_are_tested_for(name):
    r = _requirements()[name]
    upper = [s for s in r.specifier if s.operator in ("<", "<=", "~=", "==")]
    assert upper, f"pyproject.toml gives {name} no upper bound ({r}); its private API may change in any release"
    try:
        installed = metadata.version(name)
    except metadata.PackageNotFoundError:
        pytest.skip(f"{name} is not installed")
    assert r.specifier.contains(installed, prereleases=True), f"{name} {installed} is outside {r.specifier}"


def _gguf_bytes(path: Path, write) -> bytes:
    import gguf

    a = np.arange(3 * 40, dtype=np.float32).reshape(3, 40)
    b = np.arange(7, dtype=np.float16)
    w = gguf.GGUFWriter(None, "llama")
    for name, t in (("a", a), ("b", b)):
        w.add_tensor_info(name, t.shape, t.dtype, t.nbytes)
    w.write_header_to_file(path)
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    write(w, a, b)
    w.close()
    return path.read_bytes()


def test_gguf_blocks_write_the_bytes_gguf_py_writes(tmp_path):
    def stock(w, a, b):
        w.write_tensor_data(a)
        w.write_tensor_data(b)

    def blocks(w, a, b):
        compat.gguf_write_tensor_blocks(w, [a[:1], a[1:]], a.nbytes)  # a tensor in two row blocks
        compat.gguf_write_tensor_blocks(w, [b], b.nbytes)

    assert _gguf_bytes(tmp_path / "blocks.gguf", blocks) == _gguf_bytes(tmp_path / "stock.gguf", stock)


def test_gguf_blocks_refuse_out_of_order_and_short_data(tmp_path):
    import gguf

    from convert.errors import ConvertError

    w = gguf.GGUFWriter(None, "llama")
    a = np.zeros(8, np.float32)
    w.add_tensor_info("a", a.shape, a.dtype, a.nbytes)
    with pytest.raises(ConvertError, match="out of order"):
        compat.gguf_write_tensor_blocks(w, [a], a.nbytes)  # no header written yet
    w.write_header_to_file(tmp_path / "x.gguf")
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    with pytest.raises(ConvertError, match="wrote 16 of 32 bytes"):
        compat.gguf_write_tensor_blocks(w, [a[:4]], a.nbytes)
    w.close()


def _installed_log_callback(llama_cpp) -> int:
    import ctypes

    cb, user = llama_cpp.llama_log_callback(), ctypes.c_void_p()
    llama_cpp.llama_log_get(ctypes.byref(cb), ctypes.byref(user))
    return ctypes.cast(cb, ctypes.c_void_p).value


def test_llama_cpp_log_callback_is_the_one_llama_cpp_python_installs():
    import ctypes

    llama_cpp = pytest.importorskip("llama_cpp")
    from convert.runtimes.llamacpp import native_logs

    own = compat.llama_cpp_log_callback()
    assert isinstance(own, llama_cpp.llama_log_callback) and own is compat.llama_cpp_log_callback()
    address = ctypes.cast(own, ctypes.c_void_p).value
    assert _installed_log_callback(llama_cpp) == address  # installed at import
    with native_logs() as nl:
        assert _installed_log_callback(llama_cpp) == ctypes.cast(nl.callback, ctypes.c_void_p).value
    assert _installed_log_callback(llama_cpp) == address  # and put back


def test_lm_eval_module_is_the_one_its_tasks_share(tmp_path):
    f = tmp_path / "task_utils.py"
    f.write_text("VALUE = 1\n")
    m = compat.lm_eval_load_module(f)
    assert m.VALUE == 1 and compat.lm_eval_load_module(f) is m
    import lm_eval.tasks as lm_tasks

    niah = compat.lm_eval_load_module(Path(lm_tasks.__file__).parent / "ruler" / "niah_utils.py")
    assert callable(niah.get_haystack)


def test_lm_eval_namespace_is_where_task_code_looks_its_helpers_up(tmp_path):
    f = tmp_path / "ns_utils.py"
    f.write_text("import functools\n\n\ndef helper():\n    return 1\n\n\n"
                 "@functools.lru_cache  # a wrapper with no __globals__ of its own\ndef task():\n    return helper()\n")
    m = compat.lm_eval_load_module(f)
    ns = compat.lm_eval_namespace(m)
    assert compat.lm_eval_namespace(m.task) is ns
    ns["helper"] = lambda: 2
    assert m.task() == 2


def test_ruler_names_the_pipeline_swaps_are_where_lm_eval_looks_them_up():
    import random

    from convert.evaluate.engine import ruler_niah_module
    from convert.evaluate.ruler_data import MODULES, ruler_module

    for name, (dataset_fns, generators) in MODULES.items():
        ns = compat.lm_eval_namespace(ruler_module(name))
        assert ns is vars(ruler_module(name))
        missing = [f for f in dataset_fns + generators if not callable(ns.get(f))]
        assert not missing, f"lm-eval's ruler/{name} has no {missing}: ruler_samples would run them as shipped"
    cwe = compat.lm_eval_namespace(ruler_module("cwe_utils.py"))
    assert isinstance(cwe["RNG"], random.Random) and isinstance(cwe["WORDS"], list)  # ruler_data._reset_module_rng
    nu = ruler_niah_module()
    pn = compat.lm_eval_namespace(nu.generate_samples)  # engine.local_haystack swaps these two
    assert pn is vars(sys.modules["lm_eval.tasks.ruler.prepare_niah"])
    assert callable(pn["cached_sent_tokenize"]) and callable(nu.get_haystack)


def test_mlx_rope_frequencies_are_what_mlx_lm_rotates_by():
    from convert.runtimes.mlx import mlx_version

    if mlx_version() is None:
        pytest.skip("mlx-lm does not import here")
    import mlx.core as mx
    import mlx.nn as nn
    from mlx_lm.models.rope_utils import SuScaledRoPE, YarnRoPE

    dims, pos = 16, 100
    su = SuScaledRoPE(dims, base=10000.0, max_position_embeddings=256, original_max_position_embeddings=64,
                      short_factor=[1.0] * 8, long_factor=[1.0 + i for i in range(8)], long_mscale=1.3)
    yarn = YarnRoPE(dims, scaling_factor=4.0, original_max_position_embeddings=64, mscale=1.0)
    assert compat.mlx_rope_frequencies(nn.RoPE(dims)) is None
    mx.random.seed(0)
    x = mx.random.normal((1, 1, 1, dims))
    xv = np.array(x, dtype=np.float64)[0, 0, 0]
    for rope, want_scale in ((su, 1.3), (yarn, float(yarn.mscale))):
        freqs, scale = compat.mlx_rope_frequencies(rope)
        assert scale == pytest.approx(want_scale) and scale != 1.0
        angle = pos / np.array(freqs, dtype=np.float64)  # what convert.runtimes.mlx.rope_of takes 1 / freqs for
        x1, x2 = xv[: dims // 2], xv[dims // 2 :]
        want = scale * np.concatenate([x1 * np.cos(angle) - x2 * np.sin(angle), x1 * np.sin(angle) + x2 * np.cos(angle)])
        got = np.array(rope(x, offset=pos), dtype=np.float64)[0, 0, 0]
        np.testing.assert_allclose(got, want, atol=1e-4, err_msg=type(rope).__name__)


def test_a_model_marked_dequantised_saves_as_an_ordinary_checkpoint(tiny_models, tmp_path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(tiny_models[("llama", False)]))
    model.config.quantization_config = {"quant_method": "gguf"}
    model.is_quantized = True
    model.hf_quantizer = None
    compat.mark_dequantised(model)
    assert not model.is_quantized and model.hf_quantizer is None
    model.save_pretrained(str(tmp_path / "out"))
    assert "quantization_config" not in json.loads((tmp_path / "out" / "config.json").read_text())


def test_attention_function_registry_is_the_one_register_writes():
    from transformers import AttentionInterface

    from convert.runtimes.dpe import ATTN_NAME, _register

    assert compat.attention_function_registered("sdpa")
    assert not compat.attention_function_registered("dprope-no-such-attention")
    _register()
    assert compat.attention_function_registered(ATTN_NAME) and ATTN_NAME in AttentionInterface()


def test_attn_implementation_is_what_set_attn_implementation_left(tiny_models):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(tiny_models[("llama", False)]), attn_implementation="eager")
    assert compat.attn_implementation(model.config) == "eager"
    model.set_attn_implementation("sdpa")
    assert compat.attn_implementation(model.config) == "sdpa"


HEAD_DIM, ORIGINAL = 16, 64


def _longrope_rotary():
    """transformers' rotary module of a longrope config: short factors inside 64 positions, long ones past them."""
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    n = HEAD_DIM // 2
    cfg = LlamaConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      rope_parameters={"rope_type": "longrope", "rope_theta": 10000.0, "factor": 4.0,
                                       "long_factor": [2.0] * n, "short_factor": [1.5] * n,
                                       "original_max_position_embeddings": ORIGINAL})
    return LlamaRotaryEmbedding(cfg)


def _cos_sin(rot, pos: int):
    import torch

    with torch.no_grad():
        cos, sin = rot(torch.zeros(1, 1, HEAD_DIM), torch.tensor([[pos]]))
    return cos[0, 0].double(), sin[0, 0].double()


def _rotates_by(rot, inv, scale: float, positions=(10, 200)) -> bool:
    import torch

    for pos in positions:  # inside and past the original window
        angle = torch.cat([inv, inv]).double() * pos
        cos, sin = _cos_sin(rot, pos)
        if not (torch.allclose(cos, angle.cos() * scale, atol=1e-4) and torch.allclose(sin, angle.sin() * scale,
                                                                                        atol=1e-4)):
            return False
    return True


def _plain_inv_freq():
    import torch

    return 1.0 / 10000.0 ** (torch.arange(0, HEAD_DIM, 2).float() / HEAD_DIM)


def test_rotary_frequencies_set_hold_at_every_position():
    rot = _longrope_rotary()
    _cos_sin(rot, 200)  # past the window first: dynamic_rope_update caches the long frequencies
    inv = _plain_inv_freq() / 3.0
    assert not _rotates_by(rot, inv, 1.25)
    compat.set_rotary_frequencies(rot, inv, 1.25)
    assert _rotates_by(rot, inv, 1.25)


def test_rotary_frequencies_replaced_for_a_block_then_restored():
    rot = _longrope_rotary()
    before = {pos: _cos_sin(rot, pos) for pos in (200, 10)}  # 200 first: the long frequencies cached
    plain = _plain_inv_freq()
    with compat.rotary_frequencies_replaced(rot, plain):
        assert _rotates_by(rot, plain, rot.attention_scaling)
    after = {pos: _cos_sin(rot, pos) for pos in (200, 10)}
    assert all(all(a.equal(b) for a, b in zip(before[p], after[p])) for p in before)
    assert not _rotates_by(rot, plain, rot.attention_scaling)


def test_rotary_computed_from_tensors_is_the_module_s_own_computation_with_gradients():
    """For the same frequencies and multiplier the patched forward returns the module's own cos/sin (set in place
    with set_rotary_frequencies), in the input's dtype; gradients reach the tensors; the class's forward is back
    afterwards."""
    import torch

    rot = _longrope_rotary()
    pos = torch.tensor([[3, 10, 200, 255]])
    x = torch.zeros(1, 4, HEAD_DIM, dtype=torch.bfloat16)
    inv = (_plain_inv_freq() / torch.linspace(1, 4, HEAD_DIM // 2)).requires_grad_(True)
    scale = torch.tensor(1.25, dtype=torch.float64, requires_grad=True)
    with compat.rotary_computed_from(rot, inv, scale):
        cos, sin = rot(x, pos)
        (cos.float().sum() + sin.float().sum()).backward()
    assert cos.dtype == torch.bfloat16 and inv.grad is not None and scale.grad is not None
    assert bool((inv.grad != 0).all())
    compat.set_rotary_frequencies(rot, inv.detach(), 1.25)
    with torch.no_grad():
        own = rot(x, pos)
    assert all(torch.equal(a, b) for a, b in zip(own, (cos, sin)))
    assert "forward" not in vars(rot)  # the instance's patch is gone
    # the gradient is the calculus one: d/d inv_i of sum cos + sin over both halves and every position
    p = pos[0].double()[:, None]
    want = (2 * 1.25 * p * (-(p * inv.detach().double()).sin() + (p * inv.detach().double()).cos())).sum(0)
    assert torch.allclose(inv.grad.double(), want, rtol=0.05, atol=0.5)


def test_rotary_computed_from_leaves_the_unscaled_table_of_a_gemma3_module():
    import torch
    from transformers import Gemma3TextConfig
    from transformers.models.gemma3.modeling_gemma3 import Gemma3RotaryEmbedding

    cfg = Gemma3TextConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=HEAD_DIM,
                           num_hidden_layers=2, vocab_size=64, max_position_embeddings=256,
                           layer_types=["sliding_attention", "full_attention"])
    rot = Gemma3RotaryEmbedding(cfg)
    if compat.rotary_prefix(rot) != "full_attention_":
        pytest.skip("this transformers keeps one rotary table per module")
    x, pos = torch.zeros(1, 2, HEAD_DIM), torch.tensor([[5, 100]])
    with torch.no_grad():
        sliding = rot(x, pos, "sliding_attention")
    inv = _plain_inv_freq() / 7.0
    with torch.no_grad(), compat.rotary_computed_from(rot, inv, 1.5):
        assert all(torch.equal(a, b) for a, b in zip(rot(x, pos, "sliding_attention"), sliding))
        cos, _ = rot(x, pos, "full_attention")
    angle = torch.cat([inv, inv]).double() * 100
    assert torch.allclose(cos[0, 1].double(), angle.cos() * 1.5, atol=1e-5)
    # a short window's skipped ids reach the scaled table only; the sliding one reads the given contiguous ids
    contiguous = torch.tensor([[0, 1]])
    with torch.no_grad():
        own_contiguous = rot(x, contiguous, "sliding_attention")
    with torch.no_grad(), compat.rotary_computed_from(rot, inv, 1.5, contiguous):
        assert all(torch.equal(a, b) for a, b in zip(rot(x, pos, "sliding_attention"), own_contiguous))
        assert not torch.equal(rot(x, pos, "sliding_attention")[0], sliding[0])
        assert torch.allclose(rot(x, pos, "full_attention")[0], cos)


# ------------------------------------------------------------------------------------------- one list per concept
def test_stage_and_gguf_type_lists_are_the_canonical_ones():
    import typing

    from convert.cli import main
    from convert.names import OUTTYPES, ROPE_LAYOUTS, STAGES
    from convert.pipeline.recipe import Export

    run = main.commands["run"]
    for opt in ("start", "stop"):
        choice = next(p for p in run.params if p.name == opt).type
        assert tuple(choice.choices) == STAGES, f"`dprope run --{opt}` lists other stages than recipe.STAGES"
    export_gguf = main.commands["export-gguf"]
    assert tuple(next(p for p in export_gguf.params if p.name == "outtype").type.choices) == OUTTYPES
    item = typing.get_args(Export.model_fields["gguf"].annotation)[0]
    assert typing.get_args(item) == OUTTYPES
    assert typing.get_args(Export.model_fields["rope_layout"].annotation) == ROPE_LAYOUTS
    for cmd in ("export-gguf", "export"):
        layout = next(p for p in main.commands[cmd].params if p.name == "rope_layout").type
        assert tuple(layout.choices) == ROPE_LAYOUTS


def test_builtin_candidate_names_are_the_registered_ones():
    import dprope
    from dprope.candidates import available_candidates

    assert set(dprope.BUILTIN_CANDIDATES) <= set(available_candidates())
    assert all(c in available_candidates() for c in dprope.DEFAULT_CANDIDATES)


# import circles and layering: tests/test_layout.py (every package)


# ------------------------------------------------------------------------------------------- private APIs only in compat
# our own top-level modules: their underscore names are ours to use (bench and tests import theirs by file name)
OWN = {"convert", "dprope"} | {p.stem for d in ("bench", "tests") for p in (ROOT / d).glob("*.py")}
# attributes of dependencies' objects that no import statement reveals (a model's config, a rotary module, a Llama):
# the underscore ones convert/compat.py wraps and reviews have found elsewhere, a function's namespace, and the
# undocumented state of transformers' dynamic_rope_update (modeling_rope_utils.py)
PRIVATE_ATTRS = {"_attn_implementation", "_global_mapping", "_freqs", "_scale", "_ctx", "_model", "_batch", "_stack",
                 "_internals", "_logger", "_modules", "_dynamic_frequency_update", "_load_module_with_cache",
                 "__globals__", "original_inv_freq", "long_inv_freq"}
NAMESPACE_DUNDERS = ("__dict__", "__globals__")  # a dependency's module or function namespace


def _dependency(module: str) -> bool:
    top = module.split(".")[0]
    return top not in OWN and top not in sys.stdlib_module_names


def _private_path(dotted: str) -> bool:
    return any(part.startswith("_") and not (part.startswith("__") and part.endswith("__"))
               for part in dotted.split("."))


def private_uses(source: str, filename: str = "<snippet>") -> list[str]:
    """Where ``source`` imports a private module or name of a dependency (a path component starting with ``_``), or
    reads, writes or calls an underscore attribute (``x._y``, ``getattr(x, "_y")``) of a name a dependency's import
    bound, or of anything reached from one (``torch.nn.Module()._modules``), or one of PRIVATE_ATTRS on anything but
    ``self`` / ``cls``.  Names bound otherwise (``llama_cpp = import_llama_cpp()``) are followed by PRIVATE_ATTRS only."""
    tree = ast.parse(source, filename)
    found, bound = [], set()
    for n in ast.walk(tree):  # function-level imports included; a name bound anywhere counts everywhere
        if isinstance(n, ast.Import):
            for a in n.names:
                if _dependency(a.name):
                    if _private_path(a.name):
                        found.append(f"{filename}:{n.lineno}: import {a.name}")
                    bound.add(a.asname or a.name.split(".")[0])
        elif isinstance(n, ast.ImportFrom) and n.level == 0 and n.module and _dependency(n.module):
            for a in n.names:
                if _private_path(f"{n.module}.{a.name}"):
                    found.append(f"{filename}:{n.lineno}: from {n.module} import {a.name}")
                bound.add(a.asname or a.name)
    for n in ast.walk(tree):
        if isinstance(n, ast.Attribute):
            receiver, attr = n.value, n.attr
        elif (isinstance(n, ast.Call) and isinstance(n.func, ast.Name)
              and n.func.id in ("getattr", "hasattr", "setattr", "delattr") and len(n.args) >= 2
              and isinstance(n.args[1], ast.Constant) and isinstance(n.args[1].value, str)):
            receiver, attr = n.args[0], n.args[1].value
        else:
            continue
        if not (attr.startswith("_") or attr in PRIVATE_ATTRS):
            continue
        root = receiver
        while isinstance(root, (ast.Attribute, ast.Call, ast.Subscript)):
            root = root.func if isinstance(root, ast.Call) else root.value
        from_dependency = isinstance(root, ast.Name) and root.id in bound
        dunder = attr.startswith("__") and attr.endswith("__")
        on_self = isinstance(receiver, ast.Name) and receiver.id in ("self", "cls")
        if (from_dependency and (not dunder or attr in NAMESPACE_DUNDERS)) or (attr in PRIVATE_ATTRS and not on_self):
            found.append(f"{filename}:{n.lineno}: {ast.unparse(receiver)}.{attr}")
    return found


def test_no_private_api_of_a_dependency_outside_compat():
    compat_file = ROOT / "convert" / "compat.py"
    files = [p for p in sorted((ROOT / "convert").rglob("*.py")) if p != compat_file]
    files += sorted((ROOT / "bench").glob("*.py"))
    found = [u for p in files for u in private_uses(p.read_text(), str(p.relative_to(ROOT)))]
    assert not found, ("private APIs of dependencies outside convert/compat.py (wrap each there, with a pin test "
                       "here):\n" + "\n".join(found))


@pytest.mark.parametrize("snippet", [
    "from lm_eval.tasks._yaml_loader import _load_module_with_cache",
    "def f():\n    import llama_cpp._internals",
    "from llama_cpp import _logger",
    "import lm_eval.utils\nlm_eval.utils._x()",
    "import llama_cpp as lc\nlc._lib",
    "from transformers import AttentionInterface\nAttentionInterface._global_mapping",
    "from transformers.models.llama import modeling_llama\nmodeling_llama.LlamaRotaryEmbedding._dynamic_frequency_update",
    "import torch\ntorch.nn.Module()._modules",
    "import lm_eval.tasks.ruler as r\nr.__dict__",
    "def f(llm):\n    return llm._ctx",
    "def f(llm):\n    return llm.x._model",
    "def f(cfg):\n    return getattr(cfg, '_attn_implementation')",
    "def f(rope):\n    return hasattr(rope, '_freqs')",
    "def f(fn):\n    return fn.__globals__",
    "def f(rot, inv):\n    rot.original_inv_freq = inv",
    "def f(rot):\n    del rot.long_inv_freq",
])
def test_the_private_api_check_flags_a_private_use(snippet):
    assert private_uses(snippet), snippet


@pytest.mark.parametrize("snippet", [
    "from convert.arch import _rope_params",
    "from dprope.methods import _compute",
    "import _measure",
    "from ._helpers import x",
    "from importlib import _bootstrap",  # the standard library is no dependency
    "class A:\n    def f(self):\n        return self._batch",
    "import lm_eval\ngetattr(lm_eval, '__version__', '?')",
    "import transformers\ntransformers.__version__, type(transformers).__name__",
    "def f(m):\n    m._dprope_dpe = 1",  # our own attribute on a dependency's object
    "import llama_cpp\nllama_cpp.llama_decode(None, None)",
])
def test_the_private_api_check_passes_public_and_own_names(snippet):
    assert not private_uses(snippet), snippet


def test_the_private_api_check_sees_every_private_use_compat_wraps():
    found = "\n".join(private_uses((ROOT / "convert" / "compat.py").read_text(), "convert/compat.py"))
    for use in ("lm_eval.tasks._yaml_loader", "from llama_cpp import _logger", "AttentionInterface._global_mapping",
                "config._attn_implementation", "rope._freqs", "__globals__"):
        assert use in found, f"{use} not seen in convert/compat.py:\n{found}"
