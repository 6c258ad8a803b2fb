"""`dprope run` never reports stale results: stages are fingerprinted by the content they read and the outputs they
wrote, a run directory has one run at a time, and the manifest describes the final files."""

import dataclasses
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

import convert.pipeline.run
from convert.cli import main
from convert.errors import ConvertError
from convert.pipeline.run import run_recipe
from tiny import make_tiny

ROOT = Path(__file__).resolve().parents[1]
quiet = dict(echo=lambda *_: None)


def sha256_file(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def _recipe(tmp_path: Path, src: Path, **changes) -> Path:
    data = {"name": "tiny", "source": str(src), "target_length": 256,
            "validate": {"tasks": ["ppl"], "lengths": [64], "limit": 1}, "export": {"gguf": ["f32"]}, **changes}
    p = tmp_path / "tiny.yaml"
    p.write_text("# make tiny (dprope run tiny.yaml)\n" + yaml.safe_dump(data))
    return p


def _dry(recipe: Path, run_dir: Path, *args) -> str:
    res = CliRunner().invoke(main, ["run", str(recipe), "--run-dir", str(run_dir), "--dry-run", *args])
    assert res.exit_code == 0, res.output
    return res.output


def _line(output: str, stage: str) -> str:
    return next(ln.strip() for ln in output.splitlines() if ln.strip().startswith(stage + " "))


TRAIN = {"data": "pydoc:", "seq_len": 64, "steps": 1, "global_batch": 1, "save_steps": 1, "eval_fraction": 0.002,
         "bf16": False, "gradient_checkpointing": False}


@pytest.mark.runtime
def test_force_cpu_rerun_redoes_export_validate_verify(tiny_copy, tmp_path, monkeypatch):
    monkeypatch.setattr("convert.pipeline.run._gpu_available", lambda: False)
    recipe = _recipe(tmp_path, tiny_copy("llama"), train=TRAIN)
    run_dir = tmp_path / "run"
    s = run_recipe(recipe, run_dir, **quiet)
    assert s["stages"]["train"].startswith("skip (no GPU")
    assert [k for k, v in s["stages"].items() if v == "run"] == ["source", "factors", "bake", "export", "validate",
                                                                 "verify"]
    manifest = run_dir / "export" / "manifest.json"
    assert json.loads(manifest.read_text())["checkpoint"]["path"] == "../hf"

    s = run_recipe(recipe, run_dir, dry_run=True, force_cpu=True, **quiet)
    assert [s["stages"][k] for k in ("train", "export", "validate", "verify")] == ["run"] * 4
    out = _dry(recipe, run_dir, "--force-cpu")
    assert _line(out, "train") == "train     run (never ran)"
    for stage in ("export", "validate", "verify"):
        assert "run (input model changed (hf/ -> trained/))" in _line(out, stage)

    s = run_recipe(recipe, run_dir, force_cpu=True, **quiet)
    assert {k: v for k, v in s["stages"].items() if v == "run"} == dict.fromkeys(
        ["train", "export", "validate", "verify"], "run")
    assert s["model_dir"] == str(run_dir / "trained")
    # what the run reports now describes the trained model, and the manifest the final files
    assert json.loads(manifest.read_text())["checkpoint"]["path"] == "../trained"
    assert (run_dir / "trained" / "verify.json").exists()
    assert "Continued training" in (run_dir / "trained" / "README.md").read_text()
    from convert.stages.export import manifest_entries, manifest_problems

    files = {p.relative_to(run_dir).as_posix() for p in manifest_entries(manifest)}
    assert {"trained/README.md", "trained/verify.json", "trained/model.safetensors", "export/tiny-f32.gguf",
            "export/tiny-f32.Modelfile"} <= {os.path.normpath(f) for f in files}
    assert manifest_problems(manifest) == []

    # a later run without a GPU keeps the trained model: it is current
    s = run_recipe(recipe, run_dir, **quiet)
    assert set(s["stages"].values()) == {"skip (done)"}

    # `dprope verify` checks the manifest, rewrites verify.json and the card, and refreshes their entries
    res = CliRunner().invoke(main, ["verify", str(run_dir / "export")])
    assert res.exit_code == 0 and "| manifest | manifest.json | pass |" in res.output, res.output
    assert manifest_problems(manifest) == []


@pytest.mark.runtime
def test_replaced_source_file_reruns_from_source(tiny_copy, tokenizer, tmp_path):
    src = tiny_copy("llama")
    recipe = _recipe(tmp_path, src)
    run_dir = tmp_path / "run"
    out = _dry(recipe, run_dir)
    assert all(_line(out, s).endswith("run (never ran)") for s in ("source", "factors"))
    run_recipe(recipe, run_dir, stop="bake", **quiet)

    weights = src / "model.safetensors"
    st = weights.stat()
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # touched, same bytes: nothing to redo
    s = run_recipe(recipe, run_dir, stop="bake", dry_run=True, **quiet)
    assert [s["stages"][k] for k in ("source", "factors", "bake")] == ["skip (done)"] * 3

    # other weights of the same size at the same path, with the old mtime put back
    other = make_tiny(tmp_path / "other", "llama", seed=1, tokenizer=tokenizer) / "model.safetensors"
    assert other.stat().st_size == st.st_size and sha256_file(other) != sha256_file(weights)
    shutil.copyfile(other, weights)
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns))
    out = _dry(recipe, run_dir, "--to", "bake")
    assert _line(out, "source") == "source    run (source file changed)"
    assert _line(out, "factors") == "factors   run (source file changed)"
    assert _line(out, "bake").startswith("bake      run (")
    s = run_recipe(recipe, run_dir, stop="bake", **quiet)
    assert [s["stages"][k] for k in ("source", "factors", "bake")] == ["run"] * 3
    assert sha256_file(run_dir / "hf" / "model.safetensors") == sha256_file(other)


@pytest.mark.runtime
def test_missing_or_altered_output_reruns_that_stage(tiny_copy, tmp_path, monkeypatch):
    recipe = _recipe(tmp_path, tiny_copy("llama"))
    run_dir = tmp_path / "run"

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    table = convert.pipeline.run.STAGE_TABLE
    monkeypatch.setitem(table, "bake", dataclasses.replace(table["bake"], run=interrupted))
    with pytest.raises(KeyboardInterrupt):
        run_recipe(recipe, run_dir, stop="bake", **quiet)
    monkeypatch.undo()
    assert _line(_dry(recipe, run_dir, "--to", "bake"), "bake") == "bake      run (interrupted last time)"
    (run_dir / ".hf.partial-999999").mkdir()  # what a killed bake leaves
    run_recipe(recipe, run_dir, stop="bake", **quiet)
    assert not (run_dir / ".hf.partial-999999").exists()

    (run_dir / "hf" / "config.json").unlink()
    out = _dry(recipe, run_dir, "--to", "bake")
    assert _line(out, "factors") == "factors   skip (done)"
    assert _line(out, "bake") == "bake      run (outputs missing: hf/config.json)"
    s = run_recipe(recipe, run_dir, stop="bake", **quiet)
    assert [k for k, v in s["stages"].items() if v == "run"] == ["bake"]
    assert (run_dir / "hf" / "config.json").exists()

    with open(run_dir / "factors.json", "a") as f:
        f.write(" ")
    out = _dry(recipe, run_dir, "--to", "bake")
    assert _line(out, "factors") == "factors   run (outputs changed: factors.json)"
    assert _line(out, "bake") == "bake      run (input factors.json may change: factors runs first)"
    s = run_recipe(recipe, run_dir, stop="bake", **quiet)
    assert s["stages"]["factors"] == "run"
    s = run_recipe(recipe, run_dir, stop="bake", dry_run=True, **quiet)
    assert [s["stages"][k] for k in ("source", "factors", "bake")] == ["skip (done)"] * 3


def test_a_second_run_is_refused_while_the_directory_is_in_use(tiny_copy, tmp_path):
    recipe = _recipe(tmp_path, tiny_copy("llama"))
    run_dir = tmp_path / "run"
    # another process holds the directory
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\nfrom convert.pipeline.run import RunLock\n"
                               "lock = RunLock(sys.argv[1]).__enter__()\nprint('locked', flush=True)\ntime.sleep(600)",
         str(run_dir)], cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(ConvertError, match=rf"run directory {re.escape(str(run_dir))} is in use .*pid {holder.pid}\b"):
            run_recipe(recipe, run_dir, stop="source", **quiet)
        res = CliRunner().invoke(main, ["run", str(recipe), "--run-dir", str(run_dir), "--to", "source"])
        assert res.exit_code == 2 and f"pid {holder.pid}" in res.output and "Traceback" not in res.output
        assert f"in use by pid {holder.pid}" in _dry(recipe, run_dir)
        assert not (run_dir / ".stages").exists()  # the refused run wrote nothing
    finally:
        holder.kill()  # a crash: SIGKILL, no clean-up
        holder.wait()
    # the lock file is still there, naming the dead process, and blocks nobody
    assert (run_dir / ".lock").read_text().strip() == str(holder.pid)
    s = run_recipe(recipe, run_dir, stop="source", **quiet)
    assert s["stages"]["source"] == "run"

    # a second lock in this process (another open file description) is refused too
    from convert.pipeline.run import RunLock

    with RunLock(run_dir):
        with pytest.raises(ConvertError, match=rf"pid {os.getpid()}\b"):
            run_recipe(recipe, run_dir, stop="source", **quiet)
