"""Third-party notes go to the log file, not the terminal (convert/quiet.py)."""

import logging
import warnings

from convert.stages.bake import bake, make_plan
from convert.quiet import quiet_libraries
from convert.formats.checkpoint import open_source


def test_library_records_and_warnings_go_to_the_file_and_come_back_after(tmp_path, capfd):
    log_file = tmp_path / "third-party.log"
    shown, handlers = warnings.showwarning, logging.getLogger("transformers").handlers[:]
    with quiet_libraries(log_file) as path:
        assert path == log_file
        logging.getLogger("transformers.modeling_rope_utils").warning("unrecognized keys: short_mscale")
        logging.getLogger("lm_eval.evaluator").warning("building contexts")
        warnings.warn("a deprecated argument")
    err = capfd.readouterr().err
    assert "unrecognized keys" not in err and "building contexts" not in err and "deprecated argument" not in err
    text = log_file.read_text()
    for note in ("unrecognized keys: short_mscale", "building contexts", "a deprecated argument"):
        assert note in text
    # afterwards warnings and the libraries' own handlers are as they were
    assert warnings.showwarning is shown and logging.getLogger("transformers").handlers == handlers


def test_blocks_nest_and_the_inner_exit_keeps_the_outer_quiet(tmp_path, capfd):
    outer = tmp_path / "outer.log"
    with quiet_libraries(outer):
        with quiet_libraries(tmp_path / "inner.log") as inner:
            assert inner == outer  # the outermost block's file serves the nested one
        logging.getLogger("datasets").warning("after the inner block")
        warnings.warn("a warning after the inner block")
    assert capfd.readouterr().err == ""
    assert "after the inner block" in outer.read_text() and "a warning after the inner block" in outer.read_text()
    assert not (tmp_path / "inner.log").exists()


def test_loading_an_extended_checkpoint_prints_nothing(tiny_models, tmp_path, capfd, monkeypatch):
    """transformers 5.x prints a "Loading weights" bar and a note on the `short_mscale`/`long_mscale` keys it does
    not use when loading our config; neither reaches the terminal."""
    from convert.runtimes.hf import load_hf

    monkeypatch.setenv("DPROPE_CACHE", str(tmp_path / "cache"))
    out = bake(open_source(str(tiny_models[("llama", False)])), tmp_path / "ext", make_plan(target_length=512),
               progress=False)
    capfd.readouterr()
    load_hf(out)
    err = capfd.readouterr().err
    assert "Loading weights" not in err and "mscale" not in err, err
