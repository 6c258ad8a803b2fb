"""The adapters over dependencies' private APIs (convert/compat.py), pinned to the versions pyproject.toml allows, and
the code's shape: one list per concept, no import circle between the pipeline's modules."""

import ast
import json
from importlib import metadata
from pathlib import Path

import numpy as np
import pytest

from convert import compat

ROOT = Path(__file__).resolve().parent.parent
# the dependencies whose private APIs convert/compat.py uses (distribution names as pip knows them)
PINNED = ("gguf", "llama-cpp-python", "lm-eval", "transformers", "accelerate", "torch")


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


def test_lm_eval_module_is_the_one_its_tasks_share(tmp_path):
    f = tmp_path / "task_utils.py"
    f.write_text("VALUE = 1\n")
    m = compat.lm_eval_load_module(f)
    assert m.VALUE == 1 and compat.lm_eval_load_module(f) is m
    import lm_eval.tasks as lm_tasks

    niah = compat.lm_eval_load_module(Path(lm_tasks.__file__).parent / "ruler" / "niah_utils.py")
    assert callable(niah.get_haystack)


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


# ------------------------------------------------------------------------------------------- one list per concept
def test_stage_and_gguf_type_lists_are_the_canonical_ones():
    import typing

    from convert.cli import main
    from convert.names import OUTTYPES, ROPE_LAYOUTS, STAGES
    from convert.recipe import Export

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


def _convert_imports() -> dict[str, set[str]]:
    mods = {p.stem: p for p in (ROOT / "convert").glob("*.py")}
    graph = {}
    for m, p in mods.items():
        deps = set()
        for n in ast.walk(ast.parse(p.read_text())):  # function-level imports included
            if isinstance(n, ast.ImportFrom) and n.level == 1:
                deps.update([n.module.split(".")[0]] if n.module else [a.name for a in n.names])
            elif isinstance(n, ast.ImportFrom) and (n.module or "").startswith("convert."):
                deps.add(n.module.split(".")[1])
        graph[m] = {d for d in deps if d in mods and d != m}
    return graph


def test_no_import_circle_between_pipeline_modules():
    graph = _convert_imports()
    seen: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(m, path):
        seen[m] = 1
        for d in sorted(graph[m]):
            if seen.get(d) == 1:
                raise AssertionError("import circle: " + " -> ".join(path[path.index(d):] + [d]))
            if d not in seen:
                visit(d, path + [d])
        seen[m] = 2

    for m in sorted(graph):
        if m not in seen:
            visit(m, [m])
