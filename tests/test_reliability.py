"""Faults a user meets: a full disk during bake and export, a cache whose content changed under the same path."""

import contextlib
import errno
import os
import resource
from pathlib import Path

import pytest
from click.testing import CliRunner

from convert.bake import bake, make_plan
from convert.cli import main
from convert.source import open_source
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
    from convert.tasks import common

    d = make_tiny(tmp_path / "m", "llama", tokenizer=tiny_tokenizer("gpt-2", vocab_size=400))
    first = common.tokenizer(str(d))
    assert common.tokenizer(str(d)) is first  # unchanged files: a hit
    tiny_tokenizer("gpt-2", vocab_size=600).save_pretrained(str(d))  # same path, new files
    second = common.tokenizer(str(d))
    assert second is not first and len(second) != len(first)
    assert len(second) == len(tiny_tokenizer("gpt-2", vocab_size=600))
