"""llama.cpp's own converter (convert_hf_to_gguf.py, vendored in the llama-cpp-python sdist), to make GGUFs of tiny
models exactly as users' GGUFs are made.  Fetched once from PyPI (the sdist of the installed llama-cpp-python) into
a cache folder; the tiny models get SmolLM2's tokenizer, which the converter recognises ("smollm")."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
from importlib import metadata
from pathlib import Path

CACHE = Path(os.environ.get("DPROPE_CONVERTER_DIR", Path.home() / ".cache" / "dprope-tests" / "llama-cpp-converter"))


def converter() -> Path:
    version = metadata.version("llama_cpp_python")
    root = CACHE / version
    script = root / "vendor" / "llama.cpp" / "convert_hf_to_gguf.py"
    if script.exists():
        return script
    tmp = CACHE / f".{version}.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:",
                    f"llama-cpp-python=={version}", "-d", str(tmp)], check=True)
    sdist = next(tmp.glob(f"llama_cpp_python-{version}.tar.gz"))
    keep = ("vendor/llama.cpp/convert_hf_to_gguf.py", "vendor/llama.cpp/conversion/", "vendor/llama.cpp/gguf-py/")
    with tarfile.open(sdist) as tar:
        members = []
        for m in tar.getmembers():
            rel = m.name.split("/", 1)[-1]
            if rel.startswith(keep) and (m.isfile() or m.isdir()):
                m.name = rel
                members.append(m)
        tar.extractall(tmp, members=members, filter="data")
    sdist.unlink()
    tmp.rename(root)
    return script


def convert(hf_dir: Path, out: Path, outtype: str = "f32") -> Path:
    """``hf_dir`` -> ``out`` with llama.cpp's converter (its own gguf-py first on the path)."""
    script = converter()
    env = {**os.environ, "PYTHONPATH": str(script.parent / "gguf-py"), "NO_LOCAL_GGUF": ""}
    p = subprocess.run([sys.executable, str(script), str(hf_dir), "--outfile", str(out), "--outtype", outtype],
                       capture_output=True, text=True, env=env)
    if p.returncode != 0:
        raise RuntimeError(f"convert_hf_to_gguf.py failed on {hf_dir}:\n{p.stderr[-3000:]}")
    return out
