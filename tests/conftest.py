import os
import shutil
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))  # the benchmarks' tests import them by name

from tiny import make_tiny, tiny_tokenizer  # noqa: E402

if os.environ.get("PYTEST_XDIST_WORKER"):
    # pytest-xdist (make test: -n auto) runs one worker per core: each computes on one thread, so two workers do not
    # fight over the cores (torch's intra-op pool and its BLAS would each take every core)
    import torch

    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tokenizer():
    return tiny_tokenizer()


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory, tokenizer):
    """Random tiny llama / mistral / qwen2 checkpoints, single-file and sharded, made once per session."""
    root = tmp_path_factory.mktemp("tiny")
    made = {}
    for mt in ("llama", "mistral", "qwen2"):
        for sharded in (False, True):
            made[(mt, sharded)] = make_tiny(root / f"{mt}-{'sharded' if sharded else 'single'}", mt, sharded,
                                            tokenizer=tokenizer)
    return made


@pytest.fixture
def tiny_copy(tiny_models, tmp_path):
    """A private copy of a tiny checkpoint, safe to damage."""

    def copy(model_type="llama", sharded=False) -> Path:
        dst = tmp_path / f"src-{model_type}-{int(sharded)}"
        shutil.copytree(tiny_models[(model_type, sharded)], dst)
        return dst

    return copy


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory):
    """Every test session dequantises into its own cache and never reaches a hub."""
    old = {k: os.environ.get(k) for k in ("DPROPE_CACHE", "HF_HUB_OFFLINE")}
    os.environ["DPROPE_CACHE"] = str(tmp_path_factory.getbasetemp() / "dprope-cache")
    os.environ["HF_HUB_OFFLINE"] = "1"
    yield
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
