"""`dprope train` through `accelerate launch` with FSDP (full shard) on two CPU processes (gloo)."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors import safe_open

from convert.stages.bake import bake, make_plan
from convert.formats.checkpoint import open_source
from convert.stages.train import PackedBlocks, accelerate_config
from tiny import ORIGINAL

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow  # several processes (accelerate launch, gloo)
LAUNCH_TIMEOUT_S = 240  # about 40 s on 2 busy cores


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _held_out_loss(model, data: Path, tokenizer, seq_len: int, eval_fraction: float) -> float:
    losses = []
    with torch.no_grad():
        for block in PackedBlocks(str(data), tokenizer, seq_len, eval_fraction, held_out=True):
            ids = block["input_ids"][None]
            losses.append(float(model(ids, labels=ids).loss))
    return sum(losses) / len(losses)


def test_fsdp_two_cpu_processes_save_the_whole_model_with_the_baked_factors(tiny_models, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ck = bake(open_source(tiny_models[("llama", False)]), tmp_path / "ext", make_plan(target_length=4 * ORIGINAL),
              progress=False)
    cfg = tmp_path / "fsdp.yaml"
    cfg.write_text(yaml.safe_dump(accelerate_config(2, cpu=True), sort_keys=False))
    data = tmp_path / "repeat.txt"
    data.write_text("The quick brown fox jumps over the lazy dog. " * 400)
    out = tmp_path / "trained"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(cfg),
           "--main_process_port", str(_free_port()), str(ROOT / "tests" / "fsdp_cpu.py"),
           "train", str(ck), str(out), "--data", str(data), "--seq-len", "64", "--steps", "2", "--global-batch", "2",
           "--save-steps", "1", "--eval-fraction", "0.25", "--lr", "1e-3", "--force-cpu"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        log, _ = proc.communicate(timeout=LAUNCH_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        # SIGTERM: the launcher's agent stops its workers (each in its own session) before it exits
        proc.terminate()
        log, _ = proc.communicate()
        raise AssertionError(f"the launch did not finish in {LAUNCH_TIMEOUT_S} s (a collective waiting for a "
                             "process that never joined?):\n" + log[-3000:]) from None
    assert proc.returncode == 0, log[-5000:]

    s = json.loads((out / "train.json").read_text())
    assert s["distributed"] == "FSDP" and s["world_size"] == 2 and s["steps"] == 2
    assert not out.with_name(f".{out.name}.work").exists()  # the sharded checkpoints go once the output is whole
    # the factors are the baked ones, byte for byte, and the loaded model's rotary frequencies use them
    assert (out / "config.json").read_bytes() == (ck / "config.json").read_bytes()
    assert (out / "rope_factors.safetensors").read_bytes() == (ck / "rope_factors.safetensors").read_bytes()
    model = AutoModelForCausalLM.from_pretrained(str(out)).eval()
    factors = torch.tensor(json.loads((ck / "dprope_factors.json").read_text())["factors"])
    with torch.no_grad():
        model(torch.zeros(1, 200, dtype=torch.long))
    plain = 1.0 / (10000.0 ** (torch.arange(0, 16, 2).float() / 16))
    assert torch.allclose(model.model.rotary_emb.inv_freq, plain / factors, rtol=1e-6)
    # every tensor whole (not a rank's shard) and trained
    with safe_open(str(out / "model.safetensors"), "pt") as a, safe_open(str(ck / "model.safetensors"), "pt") as b:
        assert set(a.keys()) == set(b.keys())
        for k in b.keys():
            assert a.get_slice(k).get_shape() == b.get_slice(k).get_shape(), k
            assert not torch.equal(a.get_tensor(k), b.get_tensor(k)), f"{k} was not trained"
    # the saved weights are the ones the run evaluated at the end, not the baked ones
    tok = AutoTokenizer.from_pretrained(str(out))
    loss = _held_out_loss(model, data, tok, 64, 0.25)
    assert abs(loss - s["eval_loss_after"]) < 0.02 < abs(loss - s["eval_loss_before"]), (loss, s)
