"""The baked config.json also loads in transformers 4.57 (the last 4.x), which users pin: same inv_freq.

transformers 4.57 and its own hub/tokenizers versions are installed with `pip --target` into a cached folder
and put first on PYTHONPATH of a child process, beside this environment's torch.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from convert.stages.bake import bake, make_plan
from convert.formats.checkpoint import open_source

TF457 = Path(os.environ.get("DPROPE_TF457_DIR", Path.home() / ".cache" / "dprope-tests" / "transformers-4.57"))

CHILD = r"""
import json, sys, torch, transformers
from transformers import AutoConfig, AutoModelForCausalLM
assert transformers.__version__.startswith("4.57"), transformers.__version__
out = {}
for d in sys.argv[2:]:  # every directory in one interpreter: importing 4.57 costs more than a tiny model's forward
    model = AutoModelForCausalLM.from_pretrained(d).eval()
    ids = torch.zeros(1, int(sys.argv[1]), dtype=torch.long)
    with torch.no_grad():
        model(ids)
    rot = model.model.rotary_emb
    out[d] = {"version": transformers.__version__, "rope_type": rot.rope_type, "inv_freq": rot.inv_freq.tolist(),
              "attention_scaling": float(rot.attention_scaling), "max_pos": model.config.max_position_embeddings}
print(json.dumps(out))
"""
MODEL_TYPES = ["llama", "mistral", "qwen2"]


@pytest.fixture(scope="session")
def tf457():
    """transformers 4.57 in a cached folder, installed once; pytest-xdist's workers wait on one lock for it."""
    import fcntl
    import shutil

    TF457.parent.mkdir(parents=True, exist_ok=True)
    with open(TF457.with_name(TF457.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (TF457 / "transformers").exists():
            tmp = TF457.with_name(TF457.name + ".partial")
            shutil.rmtree(tmp, ignore_errors=True)
            subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--target", str(tmp),
                            "transformers>=4.57,<4.58"], check=True)
            tmp.rename(TF457)
    return TF457


@pytest.fixture(scope="module")
def loaded_457(tf457, tiny_models, tmp_path_factory) -> dict[str, tuple[Path, dict]]:
    """{model type: (its default extension to 256 tokens, what transformers 4.57 reads from it)}."""
    root = tmp_path_factory.mktemp("tf457")
    outs = {mt: bake(open_source(tiny_models[(mt, False)]), root / mt, make_plan(target_length=256), progress=False)
            for mt in MODEL_TYPES}
    env = {**os.environ, "PYTHONPATH": str(tf457)}
    p = subprocess.run([sys.executable, "-c", CHILD, "200", *map(str, outs.values())], capture_output=True,
                       text=True, env=env)
    assert p.returncode == 0, p.stderr[-2000:]
    got = json.loads(p.stdout.strip().splitlines()[-1])
    return {mt: (out, got[str(out)]) for mt, out in outs.items()}


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_config_loads_in_transformers_457_with_the_same_inv_freq(loaded_457, model_type):
    out, got = loaded_457[model_type]
    factors = torch.tensor(json.loads((out / "dprope_factors.json").read_text())["factors"])
    assert got["rope_type"] == "longrope" and got["max_pos"] == 256
    # the default method carries YaRN's temperature: 4.57 reads attention_factor as 5.x does
    cfg = json.loads((out / "config.json").read_text())
    assert got["attention_scaling"] == pytest.approx(cfg["rope_scaling"]["attention_factor"])
    import dprope

    want = torch.from_numpy(dprope.base_inv_freq(10000.0, 16)) / factors
    assert torch.allclose(torch.tensor(got["inv_freq"]), want, rtol=1e-6, atol=0)
