"""bench/train_quality.py on a tiny model on the CPU: the same code as the GPU run with smaller numbers (bake, score,
train at the target, score again; a search row; worker processes; a re-run that computes nothing)."""

import json

import pytest

pytestmark = pytest.mark.bench

@pytest.fixture(scope="module")
def bench():
    import train_quality  # bench/ is on the path (conftest.py)

    return train_quality


def test_every_initialisation_trained_and_scored(bench, tiny_models, tmp_path, monkeypatch):
    out = tmp_path / "out"
    args = ["--source", str(tiny_models[("llama", False)]), "--target", "256", "--inits", "pi,dprope,longrope-search",
            "--steps", "3", "--global-batch", "2", "--eval-every", "1", "--eval-blocks", "1", "--train-data", "stdlib:",
            "--corpora", "pydoc", "--samples", "1", "--passkey", "1", "--passkey-lengths", "256", "--ruler=",
            "--search-fitness", "ppl:samples=1", "--search-budget", "6", "--jobs", "2", "--out", str(out),
            "--cache", str(tmp_path / "cache")]
    assert bench.main(args) == 0
    data = json.loads((out / "train_quality.json").read_text())
    parts = {p["method"]: p for p in data["parts"]}
    assert set(parts) == {"none", "pi", "dprope", "longrope-search"} and all(p["done"] for p in parts.values())
    assert "trained" not in parts["none"]  # the base is a reference row, never trained
    for m in ("pi", "dprope", "longrope-search"):
        p = parts[m]
        tr = p["train"]
        assert tr["steps"] == 3 and tr["seq_len"] == 256 and tr["lr"] == 2e-5
        steps = [s for s, _ in tr["eval_losses"]]
        assert steps == [0, 1, 2, 3]  # held-out loss at the start, every step, and at the end
        free = next(r for r in p["free"] if r["task"] == "ppl")["metrics"]["token_perplexity"]
        trained = next(r for r in p["trained"] if r["task"] == "ppl")["metrics"]["token_perplexity"]
        assert free != trained  # training changed the model that was scored
        assert {r["task"] for r in p["trained"]} == {"ppl", "passkey"}
    # the same samples for every model: one 256-token pydoc window each
    assert {len(next(r for r in p["free"] if r["task"] == "ppl")["metrics"]["block_ll"]) for p in parts.values()} == {1}
    # the initialisations start from different factors
    frees = {m: next(r for r in parts[m]["free"] if r["task"] == "ppl")["metrics"]["token_perplexity"] for m in parts}
    assert len({round(v, 6) for v in frees.values()}) == 4
    s = parts["longrope-search"]["search"]
    assert s["evals"] == 6 and s["fitness"].startswith("ppl") and len(parts["longrope-search"]["factors"]) == 8
    md = (out / "train_quality.md").read_text()
    for m in ("pi", "dprope", "longrope-search"):
        assert f"| {m} | training-free |" in md and f"| {m} | trained 3 steps |" in md
    assert "RULER not run" in md and "passkey@256" in md
    assert (out / "train_quality.png").read_bytes()[:4] == b"\x89PNG"
    # a re-run computes nothing: every part is complete, so neither training nor lm-eval runs
    import convert.stages.train
    import convert.stages.validate

    def boom(*a, **k):
        raise AssertionError("recomputed")

    monkeypatch.setattr(convert.stages.train, "train", boom)
    monkeypatch.setattr(convert.stages.validate, "run_one", boom)
    again = list(args)
    again[again.index("--jobs") + 1] = "1"  # in this process, where the patches apply
    assert bench.main(again) == 0
    assert json.loads((out / "train_quality.json").read_text())["parts"] == data["parts"]


def test_stdlib_training_data_leaves_out_the_evaluation_corpus():
    from convert.stages.train import STDLIB, iter_texts, stdlib_files

    files = stdlib_files()
    assert len(files) > 500 and not any("pydoc_data" in f.parts for f in files)
    first = next(iter_texts(STDLIB))
    assert first == files[0].read_text(encoding="utf-8", errors="replace")
