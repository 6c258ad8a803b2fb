"""The layout reads top to bottom: every module imports only the layers below it, a stage never imports another
stage, and no package (``dprope``, ``convert``, ``bench``) has an import cycle.

Imports are read from the source with ``ast`` (module level and inside functions alike), so a lazy import that
reaches back up is caught as well as a top-level one.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("dprope", "convert", "bench")

# bottom to top; a module may import modules of lower layers, and modules of its own package within a layer
LAYERS = (
    ("dprope",),
    ("convert.errors",),
    ("convert.names", "convert.compat", "convert.options"),
    ("convert.io",),
    ("convert.quiet",),
    ("convert.arch",),
    ("convert.formats",),
    ("convert.runtimes",),
    ("convert.evaluate",),
    ("convert.card",),
    ("convert.stages",),
    ("convert.pipeline",),
    ("convert.cli",),
    ("bench",),
)
# packages whose modules are siblings that must not import each other
NO_SIDEWAYS = ("convert.stages",)


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    # hidden folders (bench/.data: downloaded third-party sources, caches) are not the project's code
    return {module_name(p): p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))
            if not any(part.startswith(".") for part in p.relative_to(ROOT).parts)}


def imports(name: str, path: Path, known: set[str]) -> set[str]:
    """Project modules ``name`` imports (relative imports resolved; ``from pkg import mod`` counted as pkg.mod)."""
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package[: len(package) - node.level + 1] + ([base] if base else []))
            targets = [f"{base}.{a.name}" for a in node.names] + [base]
        else:
            continue
        for t in targets:
            while t and t not in known:  # the longest project module the name starts with
                t = t.rpartition(".")[0]
            if t and t != name:
                out.add(t)
    if name == "bench._measure" or name.startswith("bench."):
        # benchmarks import each other by bare name (bench/ is on sys.path)
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                for t in ([a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]):
                    if f"bench.{t}" in known:
                        out.add(f"bench.{t}")
    return out


def graph() -> dict[str, set[str]]:
    mods = modules()
    known = set(mods)
    return {m: imports(m, p, known) for m, p in mods.items()}


def layer_of(mod: str) -> int:
    for i, names in enumerate(LAYERS):
        if any(mod == n or mod.startswith(n + ".") for n in names):
            return i
    raise AssertionError(f"{mod} belongs to no layer: add it to LAYERS in tests/test_layout.py")


def cycles(g: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected component with more than one module (Tarjan), as sorted lists."""
    index, low, stack, on, out = {}, {}, [], set(), []
    counter = [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in g.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(g):
        if v not in index:
            visit(v)
    return out


def violations(g: dict[str, set[str]]) -> list[str]:
    bad = []
    for mod, deps in sorted(g.items()):
        lm = layer_of(mod)
        for d in sorted(deps):
            ld = layer_of(d)
            if ld > lm:
                bad.append(f"{mod} imports {d}: a layer above it")
            elif ld == lm:
                top = next(n for n in LAYERS[lm] if mod == n or mod.startswith(n + "."))
                if not (d == top or d.startswith(top + ".")):
                    bad.append(f"{mod} imports {d}: another package of its layer")
                elif top in NO_SIDEWAYS and d != top and mod != top:
                    bad.append(f"{mod} imports {d}: a stage never imports another stage")
    return bad


def test_every_module_has_a_layer():
    for mod in graph():
        layer_of(mod)


def test_no_import_cycle_in_any_package():
    assert cycles(graph()) == []


def test_imports_point_down():
    assert violations(graph()) == []


@pytest.mark.parametrize("edges, expect_cycle", [({"a": {"b"}, "b": {"a"}}, True), ({"a": {"b"}, "b": set()}, False)])
def test_cycle_finder(edges, expect_cycle):
    assert bool(cycles(edges)) is expect_cycle


def test_upward_import_is_caught():
    g = graph()
    g["convert.io.files"] = g["convert.io.files"] | {"convert.stages.bake"}
    g["convert.stages.bake"] = g["convert.stages.bake"] | {"convert.stages.export"}
    bad = violations(g)
    assert "convert.io.files imports convert.stages.bake: a layer above it" in bad
    assert "convert.stages.bake imports convert.stages.export: a stage never imports another stage" in bad
