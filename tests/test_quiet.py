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


PLAIN_CALLS = """
import logging, sys
from pathlib import Path
from convert.runtimes.llamacpp import llama_cpp_tokenize
from convert.stages.bake import bake_gguf, make_plan
from convert.stages.inspect import describe
src, out = Path(sys.argv[1]), Path(sys.argv[2])
if sys.argv[3] == "debug":  # an application that configures logging gets llama.cpp's lines as records
    logging.basicConfig(level=logging.DEBUG, stream=sys.stdout, format="RECORD %(name)s %(levelname)s %(message)s")
ids = llama_cpp_tokenize(src, "The pass key is 12345.")  # a vocabulary-only load
bake_gguf(src, out, make_plan(target_length=16384), progress=False)
describe(out)
print("TOKENS", len(ids))
"""


def test_plain_library_calls_print_nothing_to_stderr(tmp_path):
    """A library user who configured no logging sees nothing on stderr from a vocabulary-only llama.cpp load (whose
    "n_ctx_seq > n_ctx_train (0)" warning would otherwise reach Python's last-resort handler), an in-place extension
    or its description; an application that configures logging receives llama.cpp's lines as records."""
    import subprocess
    import sys
    from pathlib import Path

    from test_smollm2 import smollm2_gguf

    root = Path(__file__).resolve().parents[1]
    for mode in ("plain", "debug"):
        out = tmp_path / f"{mode}.gguf"
        p = subprocess.run([sys.executable, "-c", PLAIN_CALLS, str(smollm2_gguf()), str(out), mode],
                           capture_output=True, text=True, cwd=root, timeout=300)
        assert p.returncode == 0, p.stderr[-2000:]
        assert p.stderr == "", p.stderr[-2000:]
        assert "TOKENS" in p.stdout and out.is_file()
        if mode == "debug":
            assert "RECORD llama.cpp" in p.stdout and "n_ctx_train" in p.stdout  # demoted to DEBUG, not lost
        else:
            assert "RECORD" not in p.stdout
