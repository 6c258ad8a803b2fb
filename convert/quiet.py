"""Third-party notes off the terminal: while a ``quiet_libraries()`` block runs, the loggers of transformers,
lm-eval, datasets, accelerate, huggingface_hub and llama.cpp, and Python warnings, write to one log file
(``~/.cache/dprope/logs/third-party.log`` by default) instead of stderr, and transformers' "Loading weights"
progress bars are off.  Our own progress bars and log records are untouched.

Without a handler of its own a library logger would fall through to Python's ``logging.lastResort`` (stderr), so
each gets the file handler, not an empty list.  Blocks nest: only the outermost swaps the handlers.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import warnings
from pathlib import Path
from typing import Iterator

LIBRARIES = ("transformers", "lm_eval", "lm-eval", "datasets", "accelerate", "huggingface_hub", "py.warnings",
             "llama.cpp")

_state = {"depth": 0, "file": None}


def third_party_log() -> Path:
    from convert.io.files import cache_root

    return cache_root() / "logs" / "third-party.log"


@contextlib.contextmanager
def quiet_libraries(log_file: Path | None = None) -> Iterator[Path]:
    """Third-party log records and warnings go to ``log_file`` for the duration of the block (see the module)."""
    if _state["depth"]:
        _state["depth"] += 1
        try:
            yield _state["file"]
        finally:
            _state["depth"] -= 1
        return
    log_file = Path(log_file or third_party_log())
    log_file.parent.mkdir(parents=True, exist_ok=True)
    hf_logging = None
    if "transformers" in sys.modules:  # it attaches its own stderr handler at first use: set that up before swapping
        from transformers.utils import logging as hf_logging

        hf_logging.get_logger("transformers")
    bars = hf_logging.is_progress_bar_enabled() if hf_logging else False
    if bars:
        hf_logging.disable_progress_bar()
    handler = logging.FileHandler(log_file)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    saved = {}
    for n in LIBRARIES:
        lg = logging.getLogger(n)
        saved[n] = (lg.handlers[:], lg.propagate)
        lg.handlers = [handler]
        lg.propagate = False
    _state.update(depth=1, file=log_file)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("default")
            logging.captureWarnings(True)
            try:
                yield log_file
            finally:
                logging.captureWarnings(False)
    finally:
        _state.update(depth=0, file=None)
        for n, (hs, prop) in saved.items():
            lg = logging.getLogger(n)
            lg.handlers, lg.propagate = hs, prop
        handler.close()
        if bars:
            hf_logging.enable_progress_bar()
