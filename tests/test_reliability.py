"""Faults a user meets (a full disk during bake and export, `kill -9` in each stage, a cache whose content changed
under the same path) and what the README says about the outputs."""

import contextlib
import errno
import os
import resource
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from convert.stages.bake import bake, make_plan
from convert.cli import main
from convert.formats.checkpoint import open_source
from tiny import ORIGINAL, make_tiny, tiny_tokenizer


@contextlib.contextmanager
def file_size_limit(nbytes: int):
    """RLIMIT_FSIZE for this process: the kernel refuses (EFBIG) any write that would take a file past ``nbytes``,
    as a filesystem with that much room left would (ENOSPC).  Python ignores SIGXFSZ, so the write fails instead of
    the process dying.  Restored on exit (a soft limit may be raised again up to the hard one)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (nbytes, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))


def _hidden(d: Path) -> list[str]:
    return sorted(p.name for p in d.iterdir() if p.name.startswith("."))


def _one_clear_error(res, *words):
    assert res.exit_code == 2, res.output
    assert res.output.count("error:") == 1 and "Traceback" not in res.output, res.output
    for w in words:
        assert w in res.output, (w, res.output)


def test_full_disk_during_bake_is_one_error_and_leaves_nothing(tiny_models, tmp_path):
    src = tiny_models[("llama", False)]
    weights = (src / "model.safetensors").stat().st_size
    out = tmp_path / "out"
    with file_size_limit(weights // 2):  # the weight copy cannot finish
        res = CliRunner().invoke(main, ["extend", str(src), str(out), "--target-length", str(4 * ORIGINAL)])
    _one_clear_error(res, str(tmp_path), "needs about", "ulimit -f")
    assert not out.exists() and _hidden(tmp_path) == []


def test_no_space_while_copying_weights(tiny_models, tmp_path, monkeypatch):
    """ENOSPC from the kernel copy after a first piece: one error with the space needed and the space free."""
    src = tiny_models[("llama", True)]
    real = os.copy_file_range
    calls = []

    def fills_up(src_fd, dst_fd, count, *a):
        calls.append(count)
        if len(calls) > 2:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(src_fd, dst_fd, count, *a)

    monkeypatch.setattr(os, "copy_file_range", fills_up)
    out = tmp_path / "out"
    res = CliRunner().invoke(main, ["extend", str(src), str(out), "--target-length", str(4 * ORIGINAL)])
    # one error: a buffered copy retried after ENOSPC would have finished here (the disk is not really full)
    _one_clear_error(res, f"no space left in {tmp_path}", "needs about", "is free")
    assert not out.exists() and _hidden(tmp_path) == []


@pytest.mark.parametrize("command", ["export", "export-gguf"])
def test_full_disk_during_export_is_one_error_and_leaves_nothing(tiny_models, tmp_path, command):
    ck = bake(open_source(tiny_models[("llama", False)]), tmp_path / "ext", make_plan(target_length=4 * ORIGINAL),
              progress=False)
    out = tmp_path / "export"
    out.mkdir()
    weights = (ck / "model.safetensors").stat().st_size  # float32: an f32 GGUF is at least as big
    args = ([command, str(ck), str(out), "--gguf", "f32", "--no-portable"] if command == "export" else
            [command, str(ck), str(out / "m.gguf"), "--outtype", "f32"])
    with file_size_limit(weights // 2):
        res = CliRunner().invoke(main, args)
    _one_clear_error(res, str(out), "needs about")
    assert sorted(p.name for p in out.iterdir()) == []  # no partial GGUF, no Modelfile, no manifest
    # with room, the same command completes
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output
    assert [p.name for p in out.iterdir() if p.suffix == ".gguf"] and _hidden(out) == []


def test_tokenizer_cache_follows_the_content_at_a_path(tmp_path):
    """The tasks' tokenizer is loaded once per content: a different tokenizer written at the same path is a miss."""
    from convert.evaluate.tasks import common

    d = make_tiny(tmp_path / "m", "llama", tokenizer=tiny_tokenizer("gpt-2", vocab_size=400))
    first = common.tokenizer(str(d))
    assert common.tokenizer(str(d)) is first  # unchanged files: a hit
    tiny_tokenizer("gpt-2", vocab_size=600).save_pretrained(str(d))  # same path, new files
    second = common.tokenizer(str(d))
    assert second is not first and len(second) != len(first)
    assert len(second) == len(tiny_tokenizer("gpt-2", vocab_size=600))


# ------------------------------------------------------------------------------------------- kill -9 per stage
STAGES_RUN = ("source", "factors", "bake", "validate", "export", "verify")  # a recipe without train:
# files whose content holds measured times (verify's MLX load time) and the files that list their digests
TIMED = {"hf/verify.json", "hf/README.md", "export/manifest.json"}


def _outputs(run_dir: Path) -> dict[str, str]:
    import hashlib

    out = {}
    for p in sorted(run_dir.rglob("*")):
        rel = p.relative_to(run_dir).as_posix()
        if p.is_file() and not any(part.startswith(".") for part in rel.split("/")) and rel not in TIMED:
            out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def _manifest_without_timed(run_dir: Path) -> dict:
    import json

    m = json.loads((run_dir / "export" / "manifest.json").read_text())
    m["checkpoint"]["files"] = {k: v for k, v in m["checkpoint"]["files"].items()
                                if k not in ("verify.json", "README.md")}
    return m


def _kill_when_started(cmd: list[str], run_dir: Path, stage: str, env: dict) -> bool:
    """Start ``cmd`` and SIGKILL it just after ``stage`` starts (its .started marker appears).  True when it died
    inside that stage; False when the stage ended first (the kill then lands in a later one, or the run ended)."""
    import signal
    import subprocess
    import time

    started, done = run_dir / ".stages" / f"{stage}.started", run_dir / ".stages" / f"{stage}.json"
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 600
        while proc.poll() is None and time.monotonic() < deadline:
            if started.exists() or done.exists():
                time.sleep(0.0 if stage == "export" else 0.05)  # into the stage's work (export: at once, it is short)
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait()
                return not done.exists()
            time.sleep(0.005)
        assert proc.returncode in (0, None), proc.stderr.read()[-3000:]
        return False
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.slow
def test_kill_9_in_each_stage_then_a_rerun_gives_the_uninterrupted_outputs(tiny_copy, tmp_path):
    import shutil
    import sys

    import yaml

    from convert.pipeline.run import RunDir, run_recipe

    src = tiny_copy("llama")
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text("# dprope run tiny.yaml\n" + yaml.safe_dump(
        {"name": "tiny", "source": str(src), "target_length": 256,
         "validate": {"tasks": ["ppl"], "lengths": [64], "limit": 1},
         "export": {"gguf": ["f32", "f16", "q8_0"]}}))
    run_dir = tmp_path / "run"
    run_recipe(recipe, run_dir, echo=lambda *_: None)  # uninterrupted
    reference, ref_manifest = _outputs(run_dir), _manifest_without_timed(run_dir)
    shutil.rmtree(run_dir)  # the same path again: paths written inside the outputs stay the same

    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "convert.cli", "run", str(recipe), "--run-dir", str(run_dir)]
    killed = [stage for stage in STAGES_RUN if _kill_when_started(cmd, run_dir, stage, env)]
    # source and factors may end within the few milliseconds before the kill, and so, since the engine no longer
    # imports torch, may a tiny model's export (three small GGUFs); the others are cut in their work
    assert {"bake", "validate", "verify"} <= set(killed), killed
    run_recipe(recipe, run_dir, echo=lambda *_: None)
    rd = RunDir(run_dir)
    assert all(rd.done(s) for s in STAGES_RUN)
    assert _outputs(run_dir) == reference and _manifest_without_timed(run_dir) == ref_manifest
    left = [p.relative_to(run_dir).as_posix() for p in run_dir.rglob(".*")
            if ".partial" in p.name or ".old-" in p.name]
    assert left == []


# ------------------------------------------------------------------------------------------- what the README says
@pytest.mark.runtime
def test_a_gguf_source_gives_its_dequantised_float32_weights(tiny_models, tmp_path):
    """A .gguf source is dequantised once (transformers' GGUF loader): the extended checkpoint holds float32
    tensors equal to the GGUF's dequantised values, not the bytes of any file of the base."""
    import gguf
    from safetensors import safe_open

    from convert.formats.gguf_export import export_gguf

    src = tiny_models[("llama", False)]
    base = export_gguf(src, tmp_path / "base-q8_0.gguf", "q8_0", progress=False)
    out = bake(open_source(base), tmp_path / "ext", make_plan(target_length=4 * ORIGINAL), progress=False)
    reader = gguf.GGUFReader(str(base))
    down = next(t for t in reader.tensors if t.name == "blk.0.ffn_down.weight")
    assert down.tensor_type == gguf.GGMLQuantizationType.Q8_0
    want = gguf.quants.dequantize(down.data, down.tensor_type)
    with safe_open(str(out / "model.safetensors"), "np") as f, safe_open(str(src / "model.safetensors"), "np") as g:
        got = f.get_tensor("model.layers.0.mlp.down_proj.weight")
        assert got.dtype == np.float32 and np.array_equal(got, want.reshape(got.shape))
        assert not np.array_equal(got, g.get_tensor("model.layers.0.mlp.down_proj.weight"))  # q8_0 rounding
