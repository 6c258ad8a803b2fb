"""Continued training: packing, launch configs, and a CPU smoke run that learns, resumes and keeps the factors."""

import json

import pytest
import torch
import yaml
from click.testing import CliRunner

from convert.stages.bake import bake, make_plan
from convert.cli import main
from convert.errors import ConvertError
from convert.formats.checkpoint import open_source
from convert.stages.train import PackedBlocks, TrainArgs, accelerate_config, grad_accumulation, memory_estimate_gb, pack, train
from tiny import ORIGINAL


def test_pack_makes_exact_blocks_across_documents(tokenizer):
    docs = ["alpha beta gamma " * 50, "delta epsilon " * 40, "short"]
    blocks = list(pack(iter(docs), tokenizer, 32, chunk_chars=37))
    assert blocks and all(len(b) == 32 for b in blocks)
    flat = [t for b in blocks for t in b]
    eos = tokenizer.eos_token_id
    assert flat.count(eos) >= 1  # documents are joined with EOS
    whole = []
    for d in docs:
        whole += tokenizer(d, add_special_tokens=False).input_ids + [eos]
    # chunked tokenisation may split differently at chunk edges, but the stream is the same length give or take
    assert abs(len(whole) - len(flat)) < 32 + 10


def test_held_out_blocks_are_disjoint_from_training(tokenizer, tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_text("\n".join(json.dumps({"text": f"document number {i} " * 30}) for i in range(20)))
    train_b = PackedBlocks(str(f), tokenizer, 16, 0.25, held_out=False)
    eval_b = PackedBlocks(str(f), tokenizer, 16, 0.25, held_out=True, max_eval=10_000)
    ev = [tuple(b["input_ids"].tolist()) for b in eval_b]
    it = iter(train_b)
    tr = [tuple(next(it)["input_ids"].tolist()) for _ in range(4 * len(ev))]
    assert ev and len(ev) < len(tr)
    all_blocks = list(pack((json.loads(line)["text"] for line in f.read_text().splitlines()), tokenizer, 16))
    assert ev == [tuple(b) for i, b in enumerate(all_blocks) if i % 4 == 0]
    n_train = len(all_blocks) - len(ev)
    # training takes every block that is not held out, in order, then starts over
    assert tr[:n_train] == [tuple(b) for i, b in enumerate(all_blocks) if i % 4 != 0]


def test_bad_data_is_a_clear_error(tokenizer, tmp_path):
    f = tmp_path / "bad.jsonl"
    f.write_text('{"txt": "no text field"}\n')
    with pytest.raises(ConvertError, match="'text' field"):
        list(PackedBlocks(str(f), tokenizer, 8, 0.5, held_out=True))
    with pytest.raises(ConvertError, match="does not exist"):
        list(PackedBlocks(str(tmp_path / "missing"), tokenizer, 8, 0.5, held_out=True))


def test_launch_configs():
    one = accelerate_config(1)
    assert one["distributed_type"] == "NO" and one["num_processes"] == 1
    eight = accelerate_config(8, layer_cls="MistralDecoderLayer")
    assert eight["distributed_type"] == "FSDP" and eight["num_processes"] == 8
    assert eight["fsdp_config"]["fsdp_sharding_strategy"] == "FULL_SHARD"
    assert eight["fsdp_config"]["fsdp_transformer_layer_cls_to_wrap"] == "MistralDecoderLayer"
    assert grad_accumulation(64, 1, 8) == 8 and grad_accumulation(64, 2, 1) == 32
    with pytest.raises(ConvertError, match="multiple"):
        grad_accumulation(64, 3, 1)


def test_cli_writes_a_launch_config(tiny_models, tmp_path):
    ck = bake(open_source(tiny_models[("qwen2", False)]), tmp_path / "ext", make_plan(target_length=256),
              progress=False)
    res = CliRunner().invoke(main, ["train", str(ck), str(tmp_path / "o"), "--data", "pydoc:", "--seq-len", "256",
                                    "--steps", "1", "--write-launch-config", str(tmp_path / "fsdp.yaml"),
                                    "--num-gpus", "8"])
    assert res.exit_code == 0, res.output
    cfg = yaml.safe_load((tmp_path / "fsdp.yaml").read_text())
    assert cfg["fsdp_config"]["fsdp_transformer_layer_cls_to_wrap"] == "Qwen2DecoderLayer"


def test_memory_estimate_llama2_7b_16k():
    one = memory_estimate_gb(6.74e9, 16384, 4096, 32, 1, pure_bf16=True)
    eight = memory_estimate_gb(6.74e9, 16384, 4096, 32, 8)
    assert one["total_gb"] < 80 and eight["total_gb"] < 30


def test_no_gpu_refuses_without_force_cpu(tiny_models, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    ck = bake(open_source(tiny_models[("llama", False)]), tmp_path / "ext", make_plan(target_length=256),
              progress=False)
    res = CliRunner().invoke(main, ["train", str(ck), str(tmp_path / "o"), "--data", "pydoc:", "--seq-len", "64",
                                    "--steps", "1"])
    assert res.exit_code == 2 and "--force-cpu" in res.output


def test_cpu_smoke_run_learns_resumes_and_keeps_the_factors(tiny_models, tmp_path):
    from transformers import AutoModelForCausalLM

    ck = bake(open_source(tiny_models[("llama", False)]), tmp_path / "ext", make_plan(target_length=4 * ORIGINAL),
              progress=False)
    data = tmp_path / "repeat.txt"
    data.write_text("The quick brown fox jumps over the lazy dog. " * 400)  # a repeated text: easy to learn
    args = TrainArgs(str(data), seq_len=128, steps=4, global_batch=2, micro_batch=1, lr=3e-3, save_steps=2,
                     eval_fraction=0.25, eval_steps=2)
    out = tmp_path / "trained"
    s = train(ck, out, args, force_cpu=True, progress=False)
    assert s["steps"] == 4 and not out.with_name(f".{out.name}.work").exists()  # a finished run cleans up
    assert s["eval_loss_after"] < s["eval_loss_before"]
    assert s["train_losses"][-1] < s["train_losses"][0]
    assert (out / "config.json").read_bytes() == (ck / "config.json").read_bytes()  # factors exactly as baked
    assert (out / "rope_factors.safetensors").read_bytes() == (ck / "rope_factors.safetensors").read_bytes()
    model = AutoModelForCausalLM.from_pretrained(str(out))
    factors = torch.tensor(json.loads((ck / "dprope_factors.json").read_text())["factors"])
    with torch.no_grad():
        model(torch.zeros(1, 200, dtype=torch.long))
    plain = 1.0 / (10000.0 ** (torch.arange(0, 16, 2).float() / 16))
    assert torch.allclose(model.model.rotary_emb.inv_freq, plain / factors, rtol=1e-6)
    assert "## Continued training" in (out / "README.md").read_text()


def test_resume_from_a_checkpoint(tiny_models, tmp_path, monkeypatch):
    """A run that dies after its first checkpoint resumes from it: the step count continues."""
    import transformers

    ck = bake(open_source(tiny_models[("llama", False)]), tmp_path / "ext", make_plan(target_length=4 * ORIGINAL),
              progress=False)
    data = tmp_path / "repeat.txt"
    data.write_text("Pack my box with five dozen liquor jugs. " * 300)
    args = TrainArgs(str(data), seq_len=64, steps=4, global_batch=1, lr=1e-3, save_steps=2, eval_fraction=0.25)
    out = tmp_path / "t"
    orig_save = transformers.Trainer._save_checkpoint
    calls = {"n": 0}

    def save_then_die(self, *a, **k):
        orig_save(self, *a, **k)
        calls["n"] += 1
        raise KeyboardInterrupt

    monkeypatch.setattr(transformers.Trainer, "_save_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        train(ck, out, args, force_cpu=True, progress=False)
    assert not out.exists() and (out.with_name(".t.work") / "checkpoint-2").exists()
    monkeypatch.undo()
    s = train(ck, out, args, force_cpu=True, progress=False)
    assert s["resumed_from"].endswith("checkpoint-2") and s["steps"] == 4


@pytest.mark.gpu
def test_short_gpu_run(tiny_models, tmp_path):
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    ck = bake(open_source(tiny_models[("mistral", False)]), tmp_path / "ext", make_plan(target_length=256),
              progress=False)
    s = train(ck, tmp_path / "o", TrainArgs("pydoc:", seq_len=256, steps=5, global_batch=4, micro_batch=2, lr=1e-3,
                                            save_steps=5), progress=False)
    assert s["device"] == "cuda" and s["steps"] == 5 and s["eval_loss_after"] < s["eval_loss_before"]


@pytest.mark.parametrize("model_type", ["llama", "qwen2"])
def test_chunked_loss_equals_transformers_loss_and_gradients(tiny_models, model_type):
    """The loss and every gradient of ``chunked_lm_loss`` equal the model's own (transformers' ForCausalLMLoss), with
    ignored labels, chunks that do not divide the length, and the Trainer's num_items_in_batch."""
    from transformers import AutoModelForCausalLM

    from convert.stages.train import chunked_lm_loss

    model = AutoModelForCausalLM.from_pretrained(str(tiny_models[(model_type, False)]), dtype=torch.float32)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (2, 45), generator=g)
    labels = ids.clone()
    labels[0, :7] = -100
    for n_items in (None, torch.tensor(71)):
        model.zero_grad()
        ref = model(input_ids=ids, labels=labels, **({"num_items_in_batch": n_items} if n_items is not None else {}))
        ref.loss.backward()
        ref_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        model.zero_grad()
        loss = chunked_lm_loss(model, ids, labels, 8, n_items)
        loss.backward()
        assert torch.allclose(loss, ref.loss, rtol=1e-5, atol=1e-6), (loss.item(), ref.loss.item())
        grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
        assert grads.keys() == ref_grads.keys() and len(grads) > 5
        for n in grads:
            assert torch.allclose(grads[n], ref_grads[n], rtol=1e-4, atol=1e-6), n


def test_training_with_the_chunked_loss_follows_transformers_loss(tiny_models, tmp_path, monkeypatch):
    """Two CPU runs, same data and seed: loss in chunks of 16 positions and transformers' own loss (0) log the same
    training and held-out losses."""
    import convert.stages.train as T

    calls = []
    orig = T.chunked_lm_loss
    monkeypatch.setattr(T, "chunked_lm_loss", lambda *a, **k: calls.append(a[3]) or orig(*a, **k))
    ck = bake(open_source(tiny_models[("llama", False)]), tmp_path / "ext", make_plan(target_length=4 * ORIGINAL),
              progress=False)
    data = tmp_path / "repeat.txt"
    data.write_text("Sphinx of black quartz, judge my vow. " * 300)
    runs = {}
    for chunk in (16, 0):
        args = TrainArgs(str(data), seq_len=96, steps=3, global_batch=2, micro_batch=1, lr=3e-3, save_steps=10,
                         eval_fraction=0.25, eval_steps=3, loss_chunk=chunk)
        n = len(calls)
        runs[chunk] = train(ck, tmp_path / f"t{chunk}", args, force_cpu=True, progress=False)
        # the chunked run computed every training and held-out loss in chunks; the other none
        assert (len(calls) > n + 3) if chunk else (len(calls) == n)
    a, b = runs[16], runs[0]
    assert a["train_losses"] == pytest.approx(b["train_losses"], rel=1e-4)
    assert a["eval_loss_before"] == pytest.approx(b["eval_loss_before"], rel=1e-5)
    assert a["eval_loss_after"] == pytest.approx(b["eval_loss_after"], rel=1e-4)
    assert a["train_losses"][-1] < a["train_losses"][0]
