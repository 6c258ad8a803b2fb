"""gguf-py's constants (``GGUFValueType``, ``GGMLQuantizationType``, ``GGML_QUANT_SIZES``) without importing the
gguf package.

``import gguf`` runs the package's ``__init__``, which also imports its reader, writer, vocabulary, quantisation and
metadata modules (the last one imports yaml): ~60-80 ms on a 2-core CPU, paid by every in-place ``dprope extend`` and
``dprope inspect`` that needs only the tables.  ``gguf/constants.py`` imports nothing but ``enum`` and ``typing``, so
it is loaded here on its own, from the installed package's folder (found with ``importlib.util.find_spec``, which
does not import it).  Once the package itself is imported, its own module is returned, so a process never holds two
copies it mixes: the enums are ``IntEnum`` and compare equal to gguf's by value either way.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

_loaded: ModuleType | None = None


def constants() -> ModuleType:
    """gguf-py's ``gguf.constants`` module (its own where ``gguf`` is imported, else a standalone copy of it)."""
    global _loaded
    mod = sys.modules.get("gguf.constants")
    if mod is not None:
        return mod
    if _loaded is None:
        spec = importlib.util.find_spec("gguf")
        locations = list(spec.submodule_search_locations or []) if spec is not None else []
        path = Path(locations[0]) / "constants.py" if locations else None
        if path is None or not path.is_file():  # not a regular package install: the package's own import
            import gguf

            return gguf.constants
        cspec = importlib.util.spec_from_file_location("_dprope_gguf_constants", path)
        module = importlib.util.module_from_spec(cspec)
        cspec.loader.exec_module(module)
        _loaded = module
    return _loaded
