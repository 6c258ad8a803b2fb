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
model = AutoModelForCausalLM.from_pretrained(sys.argv[1]).eval()
ids = torch.zeros(1, int(sys.argv[2]), dtype=torch.long)
with torch.no_grad():
    model(ids)
rot = model.model.rotary_emb
print(json.dumps({"version": transformers.__version__, "rope_type": rot.rope_type,
                  "inv_freq": rot.inv_freq.tolist(), "attention_scaling": float(rot.attention_scaling),
                  "max_pos": model.config.max_position_embeddings}))
"""


@pytest.fixture(scope="session")
def tf457():
    if not (TF457 / "transformers").exists():
        TF457.parent.mkdir(parents=True, exist_ok=True)
        tmp = TF457.with_name(TF457.name + ".partial")
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--target", str(tmp),
                        "transformers>=4.57,<4.58"], check=True)
        tmp.rename(TF457)
    return TF457


@pytest.mark.parametrize("model_type", ["llama", "mistral", "qwen2"])
def test_config_loads_in_transformers_457_with_the_same_inv_freq(tf457, tiny_models, tmp_path, model_type):
    out = bake(open_source(tiny_models[(model_type, False)]), tmp_path / "out", make_plan(target_length=256),
               progress=False)
    factors = torch.tensor(json.loads((out / "dprope_factors.json").read_text())["factors"])
    env = {**os.environ, "PYTHONPATH": str(tf457)}
    p = subprocess.run([sys.executable, "-c", CHILD, str(out), "200"], capture_output=True, text=True, env=env)
    assert p.returncode == 0, p.stderr[-2000:]
    got = json.loads(p.stdout.strip().splitlines()[-1])
    assert got["rope_type"] == "longrope" and got["max_pos"] == 256
    # the default method carries YaRN's temperature: 4.57 reads attention_factor as 5.x does
    cfg = json.loads((out / "config.json").read_text())
    assert got["attention_scaling"] == pytest.approx(cfg["rope_scaling"]["attention_factor"])
    import dprope

    want = torch.from_numpy(dprope.base_inv_freq(10000.0, 16)) / factors
    assert torch.allclose(torch.tensor(got["inv_freq"]), want, rtol=1e-6, atol=0)
