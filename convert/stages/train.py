"""Train stage: short continued training at the target length, on one GPU or many (optional; CPU for smoke runs).

Engine: Hugging Face Trainer (Accelerate underneath), so one process on one GPU and `accelerate launch` /
`torchrun` over a node run the same code; several GPUs shard the model with FSDP (full shard).  Data are text files
or JSONL, tokenised and packed into seq_len blocks as they stream (never all in RAM); every n-th block is held out
for the eval loss.  The RoPE factors stay exactly as baked: the output's config.json is the input's, byte for byte,
and the rotary frequencies are checked after training.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from convert.errors import ConvertError

log = logging.getLogger(__name__)

PYDOC = "pydoc:"  # --data pydoc: trains on Python's own documentation (offline, for smoke runs)
# --data stdlib: the Python standard library's own source (every .py file, sorted by path; millions of tokens on every
# CPython, offline).  pydoc_data is left out: it holds the documentation text that evaluations use as a corpus.
STDLIB = "stdlib:"
STDLIB_EXCLUDE = ("pydoc_data", "site-packages", "dist-packages")


def stdlib_files() -> list[Path]:
    import sysconfig

    root = Path(sysconfig.get_paths()["stdlib"])
    return sorted((f for f in root.rglob("*.py") if not set(f.relative_to(root).parts) & set(STDLIB_EXCLUDE)),
                  key=lambda f: f.relative_to(root).as_posix())


# ------------------------------------------------------------------------------------------- data
def iter_texts(data: str) -> Iterator[str]:
    """Documents from a .txt file (one document per file), a folder of .txt/.jsonl files, or JSONL with 'text'."""
    if data == PYDOC:
        from convert.evaluate.tasks.ppl import default_corpus_text

        yield default_corpus_text()
        return
    if data == STDLIB:
        for f in stdlib_files():
            yield f.read_text(encoding="utf-8", errors="replace")
        return
    p = Path(data)
    if not p.exists():
        raise ConvertError(f"training data {data} does not exist: pass a text file, a folder of .txt / .jsonl files, "
                           "'pydoc:' for Python's own docs or 'stdlib:' for the Python standard library's source")
    files = sorted(f for f in p.rglob("*") if f.suffix in (".txt", ".jsonl", ".json")) if p.is_dir() else [p]
    if not files:
        raise ConvertError(f"no .txt or .jsonl files under {data}")
    for f in files:
        if f.suffix in (".jsonl", ".json"):
            with open(f, encoding="utf-8") as fh:
                for i, line in enumerate(fh):
                    if not line.strip():
                        continue
                    try:
                        yield json.loads(line)["text"]
                    except (json.JSONDecodeError, KeyError, TypeError):
                        raise ConvertError(f"{f}:{i + 1} is not a JSON object with a 'text' field") from None
        else:
            yield f.read_text(encoding="utf-8", errors="replace")


def pack(texts: Iterator[str], tokenizer, seq_len: int, chunk_chars: int = 1 << 16) -> Iterator[list[int]]:
    """Token blocks of exactly seq_len: documents joined with EOS, tokenised piece by piece as they stream."""
    eos = tokenizer.eos_token_id
    buf: list[int] = []
    for text in texts:
        for i in range(0, len(text), chunk_chars):
            buf.extend(tokenizer(text[i : i + chunk_chars], add_special_tokens=False).input_ids)
            while len(buf) >= seq_len:
                yield buf[:seq_len]
                buf = buf[seq_len:]
        if eos is not None:
            buf.append(eos)
    while len(buf) >= seq_len:
        yield buf[:seq_len]
        buf = buf[seq_len:]


def split_every(eval_fraction: float) -> int:
    """Every n-th block is held out for evaluation."""
    return max(2, round(1 / eval_fraction))


class PackedBlocks:
    """A torch IterableDataset of packed blocks: the training blocks (repeating over the data), or the held-out
    ones (first ``max_eval`` of them)."""

    def __init__(self, data: str, tokenizer, seq_len: int, eval_fraction: float, held_out: bool,
                 max_eval: int = 16):
        import torch

        self.torch = torch
        self.data, self.tok, self.seq_len = data, tokenizer, seq_len
        self.every, self.held_out, self.max_eval = split_every(eval_fraction), held_out, max_eval

    def _blocks(self):
        n = 0
        for i, block in enumerate(pack(iter_texts(self.data), self.tok, self.seq_len)):
            if (i % self.every == 0) == self.held_out:
                yield block
                n += 1
                if self.held_out and n >= self.max_eval:
                    return

    def __iter__(self):
        torch = self.torch
        seen = False
        while True:
            for block in self._blocks():
                seen = True
                ids = torch.tensor(block, dtype=torch.long)
                # no attention mask: a full causal block, so SDPA runs its flash kernel, not the 32k x 32k math path
                yield {"input_ids": ids, "labels": ids.clone()}
            if self.held_out:
                return
            if not seen:
                raise ConvertError(f"the training data have fewer tokens than one {self.seq_len}-token block")


def as_iterable_dataset(blocks: PackedBlocks):
    import torch

    class _DS(torch.utils.data.IterableDataset):
        def __iter__(self):
            return iter(blocks)

    return _DS()


# ------------------------------------------------------------------------------------------- launch config
def accelerate_config(num_gpus: int, mixed_precision: str = "bf16", layer_cls: str = "LlamaDecoderLayer",
                      cpu: bool = False) -> dict:
    """An `accelerate launch` config: FSDP full shard over ``num_gpus`` processes on one node (a plain single
    process when num_gpus == 1).  ``cpu``: processes on the CPU (gloo), for smoke runs; no mixed precision, and the
    model is loaded whole in every process (FSDP's rank-0 loading broadcasts from an accelerator device)."""
    if num_gpus < 1:
        raise ConvertError("num_gpus must be >= 1")
    cfg = {"compute_environment": "LOCAL_MACHINE", "machine_rank": 0, "num_machines": 1,
           "num_processes": num_gpus, "mixed_precision": "no" if cpu else mixed_precision,
           "main_training_function": "main", "rdzv_backend": "static", "same_network": True, "use_cpu": cpu}
    if num_gpus == 1:
        cfg["distributed_type"] = "NO"
    else:
        cfg["distributed_type"] = "FSDP"
        cfg["fsdp_config"] = {
            "fsdp_version": 1,
            "fsdp_sharding_strategy": "FULL_SHARD",
            "fsdp_auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
            "fsdp_transformer_layer_cls_to_wrap": layer_cls,
            "fsdp_backward_prefetch": "BACKWARD_PRE",
            # the resumable checkpoints under the work folder; the output is gathered whole (full_state_dict)
            "fsdp_state_dict_type": "SHARDED_STATE_DICT",
            "fsdp_offload_params": False,
            "fsdp_use_orig_params": True,
            "fsdp_cpu_ram_efficient_loading": not cpu,
            "fsdp_sync_module_states": not cpu,
        }
    return cfg


def grad_accumulation(global_batch: int, micro_batch: int, world_size: int) -> int:
    per_step = micro_batch * world_size
    if global_batch % per_step:
        raise ConvertError(f"global batch {global_batch} is not a multiple of micro batch x processes ({per_step})")
    return global_batch // per_step


# ------------------------------------------------------------------------------------------- training
@dataclass
class TrainArgs:
    data: str
    seq_len: int
    steps: int
    global_batch: int = 64
    micro_batch: int = 1
    lr: float = 2e-5
    weight_decay: float = 0.0
    warmup_steps: int = 0
    betas: tuple[float, float] = (0.9, 0.999)
    bf16: bool = True
    gradient_checkpointing: bool = True
    save_steps: int = 100
    eval_fraction: float = 0.01
    device: str = "auto"
    eval_steps: int | None = None
    seed: int = 0
    pure_bf16: bool = False  # weights (and so AdamW states) in bf16: what fits a 7B model on one 80 GB GPU
    eval_blocks: int = 16  # held-out blocks scored at each evaluation
    loss_chunk: int = 4096  # positions per output-head chunk of the loss (0: transformers' loss over all logits)


def _ce_sum(hidden, weight, bias, labels):
    import torch.nn.functional as F

    logits = F.linear(hidden, weight, bias).float()  # upcast as transformers' ForCausalLMLoss does
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100,
                           reduction="sum")


def chunked_lm_loss(model, input_ids, labels, chunk: int, num_items_in_batch=None):
    """transformers' causal-LM loss without the full-vocabulary logits of every position at once.

    The decoder runs once; the output head and cross entropy run ``chunk`` positions at a time, each chunk under
    activation checkpointing, so the backward pass recomputes that chunk's logits instead of keeping them: at most one
    chunk's logits (and their gradient) exist, where the model's own loss keeps seq_len x vocab logits in the
    parameter dtype, a float32 copy, and its gradient (at 32k tokens and SmolLM2's 49,152-token vocabulary, 6.4 GB
    per float32 copy).  Labels shift and reduce as transformers' ``ForCausalLMLoss`` (transformers/loss/loss_utils.py):
    the labels padded with -100 and shifted left by one, the sum over ``num_items_in_batch`` when the Trainer gives it
    (gradient accumulation), else the mean over the labelled positions."""
    import torch
    from torch.utils.checkpoint import checkpoint

    hidden = model.model(input_ids=input_ids).last_hidden_state
    head = model.get_output_embeddings()
    shift = torch.nn.functional.pad(labels, (0, 1), value=-100)[..., 1:].to(hidden.device)
    total = hidden.new_zeros((), dtype=torch.float32)
    for s in range(0, hidden.shape[1], chunk):
        total = total + checkpoint(_ce_sum, hidden[:, s:s + chunk], head.weight, head.bias, shift[:, s:s + chunk],
                                   use_reentrant=False)
    if num_items_in_batch is None:
        return total / (shift != -100).sum()
    if torch.is_tensor(num_items_in_batch):
        num_items_in_batch = num_items_in_batch.to(total.device)
    return total / num_items_in_batch


def chunked_loss_trainer(chunk: int):
    """A Trainer whose loss is ``chunked_lm_loss``.  It applies on one process without FSDP (the decoder and head are
    called on the unwrapped model, under the Trainer's autocast); elsewhere, or with ``chunk`` 0, the loss is the
    model's own."""
    from transformers import Trainer

    class ChunkedLossTrainer(Trainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            if not chunk or self.is_fsdp_enabled or self.accelerator.num_processes > 1 or "labels" not in inputs:
                return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            m = self.accelerator.unwrap_model(model)
            with self.accelerator.autocast():
                loss = chunked_lm_loss(m, inputs["input_ids"], inputs["labels"], chunk, num_items_in_batch)
            # evaluation asks for outputs: no logits are kept (prediction_loss_only)
            return (loss, {"loss": loss}) if return_outputs else loss

    return ChunkedLossTrainer


def _attn_impl(cuda: bool) -> str:
    try:
        import flash_attn  # noqa: F401

        return "flash_attention_2" if cuda else "sdpa"
    except ImportError:
        return "sdpa"


def pick_device(requested: str, force_cpu: bool, gpu: bool) -> str:
    """The device training runs on: "cpu" or "cuda".  ``requested`` is the recipe's train.device: "cpu" (always the
    CPU), "cuda" (a GPU or an error) or "auto" (the GPU; without one only --force-cpu trains, on the CPU)."""
    if requested not in ("auto", "cpu", "cuda"):
        raise ConvertError(f"train device '{requested}' is not one of auto, cpu, cuda")
    if force_cpu or requested == "cpu":
        return "cpu"
    if gpu:
        return "cuda"
    if requested == "cuda":
        raise ConvertError("train.device is 'cuda' but no GPU is visible (torch.cuda.is_available() is False): run "
                           "on a machine with a GPU, or set train.device to 'auto' (skip training without a GPU) "
                           "or 'cpu' (a CPU smoke run)")
    raise ConvertError("no GPU found: training a real model needs one; pass --force-cpu for a CPU smoke run")


def train(ckpt: Path, out: Path, args: TrainArgs, *, force_cpu: bool = False, force: bool = False,
          progress: bool = True) -> dict:
    """Fine-tune the baked checkpoint ``ckpt`` into ``out``; resumable from ``out``'s work folder."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainingArguments

    from convert.names import FACTORS_FILE
    from convert.io.files import atomic_dir
    from convert.compat import checkpointing_kwargs
    from convert.quiet import quiet_libraries

    ckpt, out = Path(ckpt), Path(out)
    cuda = pick_device(args.device, force_cpu, torch.cuda.is_available()) == "cuda"
    if not (ckpt / FACTORS_FILE).exists():
        raise ConvertError(f"{ckpt} is not a baked checkpoint (no {FACTORS_FILE}); run `dprope extend` first")
    if out.exists() and (out / "config.json").exists() and not force:
        raise ConvertError(f"{out} already exists; pass --force to replace it")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    accum = grad_accumulation(args.global_batch, args.micro_batch, world)
    use_bf16 = args.bf16 and cuda and torch.cuda.is_bf16_supported()
    dtype = torch.bfloat16 if args.pure_bf16 else torch.float32
    with quiet_libraries():  # loading bars and notes on config keys transformers does not use
        tok = AutoTokenizer.from_pretrained(str(ckpt))
        model = AutoModelForCausalLM.from_pretrained(str(ckpt), dtype=dtype, attn_implementation=_attn_impl(cuda))
    baked_cfg = (ckpt / "config.json").read_bytes()
    work = out.with_name(f".{out.name}.work")  # trainer checkpoints: kept until the output is complete
    train_ds = as_iterable_dataset(PackedBlocks(args.data, tok, args.seq_len, args.eval_fraction, held_out=False))
    eval_ds = as_iterable_dataset(PackedBlocks(args.data, tok, args.seq_len, args.eval_fraction, held_out=True,
                                               max_eval=args.eval_blocks))
    targs = TrainingArguments(
        output_dir=str(work), max_steps=args.steps, per_device_train_batch_size=args.micro_batch,
        per_device_eval_batch_size=args.micro_batch, gradient_accumulation_steps=accum, learning_rate=args.lr,
        adam_beta1=args.betas[0], adam_beta2=args.betas[1], weight_decay=args.weight_decay,
        warmup_steps=args.warmup_steps, lr_scheduler_type="constant_with_warmup" if args.warmup_steps else "constant",
        bf16=use_bf16, save_steps=args.save_steps, **checkpointing_kwargs(args.gradient_checkpointing),
        save_total_limit=2, logging_steps=1, eval_strategy="steps", eval_steps=args.eval_steps or args.save_steps,
        report_to=[], use_cpu=not cuda, seed=args.seed, disable_tqdm=not progress, dataloader_num_workers=0,
        remove_unused_columns=False, eval_on_start=True,
        # the held-out loss only: without this the Trainer keeps every evaluated block's full-vocabulary logits
        prediction_loss_only=True)
    trainer = chunked_loss_trainer(args.loss_chunk)(model=model, args=targs, train_dataset=train_ds,
                                                    eval_dataset=eval_ds)
    last = _last_checkpoint(work)
    if last:
        log.info("resuming from %s", last)
    # The loss before training comes from the Trainer's own evaluation at the start of training (eval_on_start), not
    # from an evaluate() call first: under FSDP that call wraps the model before train() does, and train() then
    # prepares no optimizer.  A resumed run keeps the first run's step-0 evaluation in its log history.
    result = trainer.train(resume_from_checkpoint=str(last) if last else None)
    first_eval = next(h["eval_loss"] for h in trainer.state.log_history if "eval_loss" in h)
    final_eval = trainer.evaluate()["eval_loss"]
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    # the held-out loss at every evaluation (step 0 first), the final one included
    curve = {int(h["step"]): float(h["eval_loss"]) for h in trainer.state.log_history if "eval_loss" in h}
    curve[int(trainer.state.global_step)] = float(final_eval)
    # the factors must be what was baked: check the live rotary module before writing anything
    from safetensors.torch import load_file

    long = load_file(str(ckpt / FACTORS_FILE))["long_factor"]
    rot = trainer.model.model.rotary_emb
    with torch.no_grad():
        trainer.model(torch.zeros(1, 1, dtype=torch.long, device=trainer.model.device),
                      position_ids=torch.tensor([[model.config.max_position_embeddings - 1]],
                                                device=trainer.model.device))
    import dprope

    from convert.compat import rotary_table

    inv, _ = rotary_table(rot)  # the scaled table (Gemma 3: the full-attention layers')
    plain = torch.from_numpy(dprope.base_inv_freq(json.loads(baked_cfg)["rope_theta"], inv.numel() * 2))
    if not torch.allclose(inv.float().cpu(), plain / long, rtol=1e-6):
        raise ConvertError("the rotary frequencies changed during training; refusing to write the output")
    summary = {"steps": int(trainer.state.global_step), "resumed_from": str(last) if last else None,
               "eval_loss_before": first_eval, "eval_loss_after": final_eval, "train_losses": losses,
               "eval_losses": sorted(curve.items()), "eval_blocks": args.eval_blocks,
               "train_runtime_s": result.metrics.get("train_runtime"), "seq_len": args.seq_len,
               "global_batch": args.global_batch, "lr": args.lr, "data": args.data, "world_size": world,
               "bf16": use_bf16, "device": "cuda" if cuda else "cpu",
               "distributed": trainer.accelerator.distributed_type.value}
    state = full_state_dict(trainer.accelerator, trainer.model)
    if trainer.is_world_process_zero():
        unwrapped = trainer.accelerator.unwrap_model(trainer.model)
        _drop_tied_output(unwrapped, state)
        with atomic_dir(out, force=True) as tmp:
            unwrapped.save_pretrained(str(tmp), state_dict=state, safe_serialization=True)
            # save_pretrained (transformers 5) rewrites the RoPE block; the baked config.json is the one that loads
            # everywhere, so it is restored byte for byte
            (tmp / "config.json").write_bytes(baked_cfg)
            for f in ckpt.iterdir():
                # verify.json describes the checkpoint it was written in, not this one
                if f.is_file() and not f.name.endswith(".safetensors") and f.name not in (
                        "config.json", "model.safetensors.index.json", "generation_config.json", "verify.json"):
                    shutil.copyfile(f, tmp / f.name)
            shutil.copyfile(ckpt / FACTORS_FILE, tmp / FACTORS_FILE)
            (tmp / "train.json").write_text(json.dumps(summary, indent=1))
            _card_section(tmp, summary)
        shutil.rmtree(work, ignore_errors=True)
    trainer.accelerator.wait_for_everyone()  # no process reports before the output is written
    return summary


def full_state_dict(accelerator, model) -> dict:
    """The whole model's weights on the main process, gathered with every process taking part.

    Under FSDP each process holds a shard: a state_dict() called on the main process alone would wait for the others
    forever, or save shards.  This is Accelerate's ``get_state_dict`` for FSDP (a FULL_STATE_DICT on rank 0, whatever
    state dict type the launch config gives the resumable checkpoints), except that weights already on the CPU are
    not "offloaded" to it: FSDP's CPU offload of CPU tensors crashes the process (seen with torch 2.13, and reported
    for CPU FSDP at https://github.com/Lightning-AI/pytorch-lightning/issues/21804).
    https://huggingface.co/docs/accelerate/usage_guides/fsdp#saving-and-loading
    """
    from accelerate.utils import DistributedType

    if accelerator.distributed_type != DistributedType.FSDP or getattr(accelerator, "is_fsdp2", False):
        return accelerator.get_state_dict(model)
    from torch.distributed.fsdp import FullStateDictConfig, StateDictType
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    on_cpu = accelerator.device.type == "cpu"
    cfg = FullStateDictConfig(offload_to_cpu=not on_cpu, rank0_only=True)
    with FSDP.state_dict_type(model, StateDictType.FULL_STATE_DICT, cfg):
        return model.state_dict()


def _drop_tied_output(model, state: dict) -> None:
    """A gathered state dict holds tied output embeddings as a second tensor, which save_pretrained would write;
    drop it, as a save of the model itself does (the model ties it again when it loads)."""
    if not getattr(model.config, "tie_word_embeddings", False):
        return
    head = model.get_output_embeddings()
    name = next((n for n, m in model.named_modules() if m is head), None)
    if name is not None:
        state.pop(f"{name}.weight", None)


def _last_checkpoint(work: Path) -> Path | None:
    if not work.exists():
        return None
    ck = [p for p in work.glob("checkpoint-*") if p.is_dir() and p.name.split("-")[-1].isdigit()]
    return max(ck, key=lambda p: int(p.name.split("-")[-1])) if ck else None


def _card_section(out: Path, s: dict) -> None:
    from convert.card import training_section

    training_section(out, s)


def train_from_recipe(recipe, ckpt: Path, out: Path, force_cpu: bool = False) -> dict:
    t = recipe.train
    args = TrainArgs(data=t.data, seq_len=t.seq_len, steps=t.steps, global_batch=t.global_batch,
                     micro_batch=t.micro_batch, lr=t.lr, weight_decay=t.weight_decay, warmup_steps=t.warmup_steps,
                     betas=tuple(t.betas), bf16=t.bf16, gradient_checkpointing=t.gradient_checkpointing,
                     save_steps=t.save_steps, eval_fraction=t.eval_fraction, device=t.device,
                     pure_bf16=t.pure_bf16, loss_chunk=t.loss_chunk)
    return train(ckpt, out, args, force_cpu=force_cpu, force=True)


def memory_estimate_gb(n_params: float, seq_len: int, hidden: int, layers: int, num_gpus: int = 1,
                       pure_bf16: bool = False) -> dict:
    """Rough per-GPU memory: weights, grads and AdamW states (FSDP shards them over GPUs) plus checkpointed
    activations (one [seq, hidden] bf16 tensor per layer, and a few for the layer being recomputed)."""
    # weights, grads, AdamW m and v: all bf16 with pure_bf16 (states follow the parameter dtype), else fp32
    bytes_state = (2 + 2 + 2 * 2) if pure_bf16 else (4 + 4 + 4 * 2)
    states = n_params * bytes_state / num_gpus / 1e9
    acts = (layers * seq_len * hidden * 2 + 16 * seq_len * hidden * 2) / 1e9
    return {"states_gb": round(states, 1), "activations_gb": round(acts, 1), "total_gb": round(states + acts, 1)}


