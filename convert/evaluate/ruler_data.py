"""RULER's synthetic samples, generated once and only as many as are scored.

lm-eval's RULER tasks build their test split on the CPU each time a task is loaded (lm_eval/tasks/ruler:
``niah_utils.py``, ``vt_utils.py``, ``cwe_utils.py``, ``fwe_utils.py``): first a search for the haystack size that
fills the length (the whole text re-tokenised at each step), then 500 samples per length, whatever ``--limit``
says.  At 32k that is minutes per task per model, paid again for every model of a comparison although the samples
depend only on the tokenizer, the length, the seed and (for the essay tasks) the haystack text.

For the duration of ``ruler_samples(...)``:

* each generator's ``num_samples`` is capped at ``limit``.  Every generator draws its samples one after another from
  one random stream and lm-eval scores the first ``limit`` documents, so the first ``limit`` of 500 are the same
  documents as ``limit`` generated alone (a test checks it);
* cwe's module-level random generator is put back to its state after import before each generation, so every
  model of a comparison gets the same documents (lm-eval never reseeds it);
* each task's dataset function is wrapped with a disk cache keyed by the function, the lengths, the tokenizer's
  files, the sample count, the seed, the haystack text and the lm-eval version.  A hit returns the stored rows and
  generates nothing; lm-eval's own code makes every miss.

Only attributes of the module objects lm-eval's YAML loader calls are swapped (as ``validate.local_haystack``
does); no installed file changes, and the originals are put back afterwards.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import json
import logging
import random
from pathlib import Path
from typing import Callable, Iterator

log = logging.getLogger(__name__)

# per lm-eval task module: (the dataset functions its YAMLs name as custom_dataset, the sample generators they call
# with num_samples=500)
MODULES = {
    "niah_utils.py": (("niah_single_1", "niah_single_2", "niah_single_3", "niah_multikey_1", "niah_multikey_2",
                       "niah_multikey_3", "niah_multivalue", "niah_multiquery"), ("generate_samples",)),
    "vt_utils.py": (("get_vt_dataset",), ("sys_vartrack_w_noise_random",)),
    "cwe_utils.py": (("get_cw_dataset",), ("sys_word_pair_random",)),
    "fwe_utils.py": (("fwe_download",), ("sys_kwext",)),
}
FORMAT = 1  # bump when the stored form changes


def _import_prepare_niah() -> None:
    """lm-eval's prepare_niah.py asks NLTK to download punkt_tab when it is imported, and prints "Downloaded punkt_tab"
    whether or not that worked: offline, NLTK's error and that line reach the terminal, after a connection attempt.
    Nothing here needs punkt (the essay tasks split sentences with ``engine._sentences``), so the import runs
    with the download skipped and its printing sent to the log."""
    import sys

    if "lm_eval.tasks.ruler.prepare_niah" in sys.modules:
        return
    import io

    import nltk

    orig = nltk.download

    def skip(*args, **kwargs):
        log.info("NLTK download of %s skipped: RULER's essay tasks split sentences locally here", args or kwargs)
        return False

    nltk.download = skip
    try:
        with contextlib.redirect_stdout(io.StringIO()) as out, contextlib.redirect_stderr(out):
            import lm_eval.tasks.ruler.prepare_niah  # noqa: F401
    finally:
        nltk.download = orig
    if out.getvalue().strip():
        log.info("lm-eval's prepare_niah import printed: %s", out.getvalue().strip())


def ruler_module(name: str):
    """The module object lm-eval's YAML loader calls for ``lm_eval/tasks/ruler/<name>``."""
    import lm_eval.tasks as lm_tasks

    from convert.compat import lm_eval_load_module

    _import_prepare_niah()
    return lm_eval_load_module(Path(lm_tasks.__file__).parent / "ruler" / name)


def _capped(gen: Callable, cap: int) -> Callable:
    def capped(*args, num_samples: int = 500, **kwargs):
        return gen(*args, num_samples=min(num_samples, cap), **kwargs)

    capped.__wrapped__ = gen
    return capped


def _key(fn: str, kwargs: dict, cap: int | None, haystack: str | None) -> str:
    import lm_eval

    from lm_eval.tasks.ruler.common_utils import DEFAULT_SEQ_LENGTHS, resolve_tokenizer_name

    from convert.evaluate.tasks.common import tokenizer_digest

    lengths = list(kwargs.get("max_seq_lengths", DEFAULT_SEQ_LENGTHS))
    parts = [FORMAT, fn, lengths, tokenizer_digest(resolve_tokenizer_name(kwargs)), cap, kwargs.get("seed"), haystack,
             getattr(lm_eval, "__version__", "?")]
    return hashlib.sha256(json.dumps(parts, default=str).encode()).hexdigest()[:20]


def _reset_module_rng(ns: dict) -> None:
    """cwe_utils draws from a module-level ``RNG = random.Random(42)`` that nothing reseeds, so its samples depend on
    how many were drawn before in the process: the second model of a comparison would get other documents.  Put it
    back to its state right after import (seeded, then used once to shuffle the sorted word list)."""
    rng = ns.get("RNG")
    if isinstance(rng, random.Random) and isinstance(ns.get("WORDS"), list):
        fresh = random.Random(42)
        fresh.shuffle(sorted(ns["WORDS"]))
        rng.setstate(fresh.getstate())


def _dataset(fn_name: str, make: Callable, ns: dict, cache_dir: Path | None, cap: int | None,
             haystack: str | None) -> Callable:
    def dataset(**kwargs):
        import datasets

        from convert.io.files import atomic_file

        path = None if cache_dir is None else cache_dir / f"{fn_name}-{_key(fn_name, kwargs, cap, haystack)}.json.gz"
        if path is not None and path.exists():
            rows = json.loads(gzip.decompress(path.read_bytes()))
            log.info("RULER %s: %d stored samples from %s", fn_name, len(rows), path)
            return {"test": datasets.Dataset.from_list(rows, split=datasets.Split.TEST)}
        log.info("RULER %s: generating samples (%s per length)", fn_name, cap or "all")
        _reset_module_rng(ns)
        out = make(**kwargs)
        if path is not None:
            cache_dir.mkdir(parents=True, exist_ok=True)
            with atomic_file(path) as tmp:
                Path(tmp).write_bytes(gzip.compress(json.dumps(list(out["test"])).encode("utf-8"), compresslevel=6))
        return out

    dataset.__wrapped__ = make
    return dataset


@contextlib.contextmanager
def ruler_samples(cache_dir: Path | None, limit: int | float | None, haystack: str | None = None) -> Iterator[None]:
    """RULER's datasets capped at ``limit`` samples per length (an int; a fraction or None keeps all 500) and kept
    under ``cache_dir`` (None: generated each time).  ``haystack``: a digest of the essay haystack in use."""
    from convert.compat import lm_eval_namespace

    cap = limit if isinstance(limit, int) and not isinstance(limit, bool) and limit > 0 else None
    saved = []
    try:
        for name, (dataset_fns, generators) in MODULES.items():
            ns = lm_eval_namespace(ruler_module(name))  # the functions find each other through these globals
            wrap = [(g, lambda f: _capped(f, cap)) for g in generators] if cap is not None else []
            wrap += [(f, lambda f, n=f, ns=ns: _dataset(n, f, ns, cache_dir and Path(cache_dir), cap, haystack))
                     for f in dataset_fns]
            for attr, make in wrap:
                if attr in ns:  # a later lm-eval may rename one: it then runs as shipped
                    saved.append((ns, attr, ns[attr]))
                    ns[attr] = make(ns[attr])
        yield
    finally:
        for ns, attr, orig in reversed(saved):
            ns[attr] = orig
