"""Recipes: every shipped one validates and plans; `dprope run` resumes and redoes exactly what changed."""

import subprocess
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

import convert.stages.export
import convert.stages.verify
from convert.cli import main
from convert.errors import ConvertError
from convert.pipeline.recipe import load_recipe
from convert.pipeline.run import RunDir, plan, run_recipe

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = sorted((ROOT / "recipes").glob("*/*.yaml"))


def test_the_recipes_the_issue_names_are_shipped():
    names = {f"{p.parent.name}/{p.stem}" for p in SHIPPED}
    assert {"smollm2/135m_16k", "smollm2/135m_32k", "llama2/7b_8k", "llama2/7b_16k", "llama3/8b_32k",
            "mistral/7b_32k", "qwen2/7b_32k", "smollm2/135m_32k_searched"} <= names


@pytest.mark.parametrize("path", SHIPPED, ids=[f"{p.parent.name}/{p.stem}" for p in SHIPPED])
def test_shipped_recipe_validates_and_dry_runs(path, tmp_path):
    r = load_recipe(path)
    first = path.read_text().splitlines()[0]
    assert first.startswith("# make ") and "dprope run" in first  # each opens with the command that runs it
    res = CliRunner().invoke(main, ["run", str(path), "--dry-run", "--run-dir", str(tmp_path / "run")])
    assert res.exit_code == 0, res.output
    assert f"recipe {r.name}" in res.output and "verify" in res.output
    assert not (tmp_path / "run").exists()  # a dry run writes nothing


def test_paper_settings():
    r8, r16 = load_recipe(ROOT / "recipes/llama2/7b_8k.yaml"), load_recipe(ROOT / "recipes/llama2/7b_16k.yaml")
    assert (r8.method.select, r8.train.steps, r8.train.seq_len) == ("top-n:40", 1000, 8192)
    assert (r16.method.select, r16.train.steps, r16.train.seq_len) == ("top-n:32", 500, 16384)
    for r in (r8, r16):
        assert (r.train.lr, r.train.global_batch, r.train.warmup_steps, r.train.weight_decay) == (2e-5, 64, 0, 0.0)


def test_make_targets_come_from_the_recipes_folder():
    out = subprocess.run(["make", "-s", "recipes"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    want = {f"{p.parent.name}-{p.stem}".replace("_", "-") for p in SHIPPED}
    assert set(out.split()) == want


def test_broken_recipe_reports_every_error_at_once(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({
        "name": "bad", "source": "x", "target_length": 4096,
        "method": {"name": "dprope", "select": "median", "bins": 1},
        "validate": {"tasks": ["passkey", "longbench"], "lengths": [8192], "gates": ["nonsense"]},
        "export": {"gguf": ["q4_k"]}, "colour": "blue"}))
    with pytest.raises(ConvertError) as e:
        load_recipe(bad)
    msg = str(e.value)
    for piece in ("method.select", "method.bins", "validate.tasks", "validate.gates", "export.gguf", "colour",
                  "go past target_length"):
        assert piece in msg, piece
    assert "error(s)" in msg


def test_bad_release_section_is_one_error_listing_every_problem(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({
        "name": "bad", "source": "x", "target_length": 4096,
        "validate": {"lengths": [1024], "release": {"tasks": ["nope"], "lengths": [8192, "long"], "limit": 0}}}))
    with pytest.raises(ConvertError) as e:
        load_recipe(bad)
    msg = str(e.value)
    for piece in ("4 error(s)", "validate.release.tasks: unknown task(s) ['nope']", "validate.release.lengths.1",
                  "validate.release.limit", "validate.release.lengths [8192, 'long'] go past target_length 4096"):
        assert piece in msg, piece
    res = CliRunner().invoke(main, ["run", str(bad), "--release", "--dry-run", "--run-dir", str(tmp_path / "r")])
    assert res.exit_code == 2 and "validate.release.tasks" in res.output
    assert res.exception is None or isinstance(res.exception, SystemExit)  # no traceback

    # well-formed: --release takes the section's fields over validate's, the rest stays
    good = tmp_path / "good.yaml"
    good.write_text(yaml.safe_dump({
        "name": "good", "source": "x", "target_length": 4096,
        "validate": {"lengths": [1024], "limit": 2, "gates": ["passkey@1024 >= 0.5"], "release": {"limit": 5}}}))
    v = load_recipe(good).validate_
    assert (v.resolved(False).limit, v.resolved(True).limit, v.resolved(True).lengths) == (2, 5, [1024])
    assert v.resolved(True).gates == ["passkey@1024 >= 0.5"]


def test_options_that_did_nothing_are_gone_or_work(tmp_path, monkeypatch):
    for value in (True, False):
        with pytest.raises(ConvertError, match=r"export\.safetensors: removed: it never did anything"):
            load_recipe(ROOT / "recipes/smollm2/135m_16k.yaml", {"export": {"safetensors": value}})
    # train.device: cpu forces the CPU even beside a GPU; cuda needs one; auto takes it when there is one
    from convert.stages.train import pick_device

    assert pick_device("cpu", False, gpu=True) == "cpu"
    assert pick_device("auto", False, gpu=True) == "cuda" and pick_device("auto", True, gpu=True) == "cpu"
    with pytest.raises(ConvertError, match="train.device is 'cuda' but no GPU is visible"):
        pick_device("cuda", False, gpu=False)
    monkeypatch.setattr("convert.pipeline.run._gpu_available", lambda: False)
    train = {"data": "pydoc:", "seq_len": 64, "steps": 1, "global_batch": 1}
    recipe = _tiny_recipe(tmp_path, tmp_path / "no-model", train={**train, "device": "cuda"})
    res = CliRunner().invoke(main, ["run", str(recipe), "--dry-run", "--run-dir", str(tmp_path / "r")])
    assert res.exit_code == 0 and "will fail: train.device is 'cuda'" in res.output
    with pytest.raises(ConvertError, match="train.device is 'cuda' but no GPU is visible"):
        run_recipe(recipe, tmp_path / "r", echo=lambda *_: None)
    assert not (tmp_path / "r" / ".stages").exists()  # refused before any stage ran
    recipe = _tiny_recipe(tmp_path, tmp_path / "no-model", train={**train, "device": "cpu"})
    assert run_recipe(recipe, tmp_path / "r", dry_run=True, echo=lambda *_: None)["stages"]["train"] == "run"


def test_validate_outputs_name_exported_ggufs(tmp_path):
    """validate.outputs lists what is measured; a GGUF type the export does not write, or YAML's boolean `on:`
    key, is refused with the reason."""
    path = ROOT / "recipes/smollm2/135m_16k.yaml"
    r = load_recipe(path, {"validate": {"outputs": ["hf", "q8_0"]}})
    assert r.validate_.outputs == ["hf", "q8_0"]
    with pytest.raises(ConvertError) as e:
        load_recipe(path, {"validate": {"outputs": ["hf", "f32", "q4"]}, "export": {"gguf": ["f16"]}})
    assert "validate.outputs: unknown output(s) ['q4']" in str(e.value)
    bad = tmp_path / "on.yaml"
    bad.write_text(path.read_text().replace("validate:\n", "validate:\n  on: [hf, q8_0]\n"))
    with pytest.raises(ConvertError, match="`on:` .* is read by YAML as the boolean true.*outputs: \\[hf, q8_0\\]"):
        load_recipe(bad)
    with pytest.raises(ConvertError, match=r"validate.outputs lists \['f32'\] but export.gguf does not write it"):
        load_recipe(path, {"validate": {"outputs": ["hf", "f32"]}})
    with pytest.raises(ConvertError, match="validate.outputs lists base-quant but export.base_quant is off"):
        load_recipe(path, {"validate": {"outputs": ["base-quant"]}, "export": {"base_quant": False}})
    # the shipped recipe validates the q8_0 GGUF in release runs only
    v = load_recipe(path).validate_
    assert v.outputs == ["hf"] and v.resolved(True).outputs == ["hf", "q8_0"]
    with pytest.raises(ConvertError, match=r"validate.release.outputs lists \['bf16'\] but export.gguf"):
        load_recipe(path, {"validate": {"release": {"outputs": ["bf16"]}}})


def _tiny_recipe(tmp_path, src: Path, **changes) -> Path:
    data = {"name": "tiny", "source": str(src), "target_length": 256,
            "validate": {"tasks": ["ppl"], "lengths": [64, 128], "limit": 1},
            "export": {"gguf": ["f32"]}}
    for k, v in changes.items():
        data[k] = v
    p = tmp_path / "tiny.yaml"
    p.write_text("# make tiny (dprope run tiny.yaml)\n" + yaml.safe_dump(data))
    return p


@pytest.mark.runtime
def test_run_resumes_and_redoes_what_changed(tiny_models, tmp_path, monkeypatch):
    src = tiny_models[("llama", False)]
    run_dir = tmp_path / "run"
    recipe = _tiny_recipe(tmp_path, src)
    quiet = dict(echo=lambda *_: None)

    # the verify stage fails (an interrupted run): the stages before it are kept, nothing after it is marked
    def boom(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(convert.stages.verify, "verify", boom)
    with pytest.raises(KeyboardInterrupt):
        run_recipe(recipe, run_dir, **quiet)
    rd = RunDir(run_dir)
    assert [s for s in ("source", "factors", "bake", "export", "validate", "verify") if rd.done(s)] == \
        ["source", "factors", "bake", "export", "validate"]
    monkeypatch.undo()

    s = run_recipe(recipe, run_dir, **quiet)
    assert s["stages"] == {"source": "skip (done)", "factors": "skip (done)", "bake": "skip (done)",
                           "train": "skip (not in recipe)", "export": "skip (done)", "validate": "skip (done)",
                           "verify": "run"}
    assert (run_dir / "export" / "manifest.json").exists() and (run_dir / "hf" / "verify.json").exists()
    assert (run_dir / "validation" / "validation.md").exists()

    s = run_recipe(recipe, run_dir, dry_run=True, **quiet)
    assert set(s["stages"].values()) == {"skip (done)", "skip (not in recipe)"}

    # a validation change redoes validation only; a new target redoes everything from the factors on
    recipe = _tiny_recipe(tmp_path, src, validate={"tasks": ["ppl"], "lengths": [64, 128], "limit": 2})
    s = run_recipe(recipe, run_dir, **quiet)
    assert [k for k, v in s["stages"].items() if v == "run"] == ["validate"]
    recipe = _tiny_recipe(tmp_path, src, target_length=192,
                          validate={"tasks": ["ppl"], "lengths": [64, 128], "limit": 2})
    r = load_recipe(recipe)
    todo = [p.name for p in plan(r, RunDir(run_dir)) if p.action == "run"]
    assert todo == ["factors", "bake", "export", "validate", "verify"]


def test_from_to_select_stages(tiny_models, tmp_path):
    recipe = _tiny_recipe(tmp_path, tiny_models[("qwen2", False)])
    s = run_recipe(recipe, tmp_path / "run", stop="bake", echo=lambda *_: None)
    assert [k for k, v in s["stages"].items() if v == "run"] == ["source", "factors", "bake"]
    assert (tmp_path / "run" / "hf" / "config.json").exists()
    with pytest.raises(ConvertError, match="comes after"):
        run_recipe(recipe, tmp_path / "run", start="export", stop="bake", echo=lambda *_: None)


def test_missing_source_says_how_to_provide_it(tmp_path):
    res = CliRunner().invoke(main, ["run", str(ROOT / "recipes/llama2/7b_8k.yaml"), "--run-dir", str(tmp_path / "r"),
                                    "--to", "source"])
    assert res.exit_code == 2
    assert "hf download meta-llama/Llama-2-7b-hf" in res.output and "--source" in res.output


def test_recipes_accept_every_registered_method_and_plugin_candidates(tmp_path):
    from dprope.methods import available_methods

    from convert.stages.search import is_search

    for name in available_methods():
        budget = "budget_steps" if name == "dprope-fit" else "budget_evals"  # the fit's budget is in steps
        method = {"name": name, **({"options": {budget: 8}} if is_search(name) else {})}  # a search: a budget
        r = load_recipe(ROOT / "recipes/smollm2/135m_16k.yaml", {"method": method})
        assert r.method.name == name
    plugin = tmp_path / "my_candidates.py"
    plugin.write_text("import torch, dprope\n"
                      "@dprope.register_candidate('quarter_pi', 'a quarter of PI')\n"
                      "def quarter(ctx):\n    return torch.full((ctx.n_pairs,), 1 + (ctx.scale - 1) / 4)\n")
    try:
        r = load_recipe(ROOT / "recipes/smollm2/135m_16k.yaml", {"method": {
            "name": "dprope-paper", "plugins": [str(plugin)], "candidates": ["extrapolation", "quarter_pi"],
            "options": {"temperature": "yarn"}}})
        assert r.method.candidates == ["extrapolation", "quarter_pi"]
        from convert.pipeline.run import _plan_of

        p = _plan_of(r)
        assert p.options["candidates"] == ["extrapolation", "quarter_pi"] and p.options["temperature"] == "yarn"
    finally:
        import dprope

        dprope.unregister_candidate("quarter_pi")
    for bad, msg in (({"name": "magic"}, "unknown method 'magic'"),
                     ({"name": "yarn", "options": {"guard": 2}}, r"no option\(s\) guard"),
                     ({"name": "dprope-paper", "candidates": ["nope"]}, "unknown candidate"),
                     ({"name": "dprope", "plugins": ["no_such_module_xyz"]}, "failed to import")):
        with pytest.raises(ConvertError, match=msg):
            load_recipe(ROOT / "recipes/smollm2/135m_16k.yaml", {"method": bad})


def test_gates_the_recipe_cannot_decide_are_refused_when_it_loads(tmp_path):
    """A gate naming a length, task or perplexity bucket the release run does not make, or an accuracy bound its
    samples cannot reach, is one more problem of the one load error, not a failure at the end of a run."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "config.json").write_text('{"max_position_embeddings": 8192}')  # the base's window: 8192
    bad = tmp_path / "gates.yaml"
    bad.write_text(yaml.safe_dump({
        "name": "gates", "source": str(src), "target_length": 32768,
        "validate": {"tasks": ["passkey", "ppl"], "lengths": [8192, 16384], "limit": 5, "colour": 1,
                     "gates": ["passkey@32768 >= 0.5", "ppl@0-4096 <= 1.05x base", "ruler@8192 >= 0.5",
                               "passkey@8192 >= 0.9", "ppl@8192-16384 <= 0.5x base"]}}))
    with pytest.raises(ConvertError) as e:
        load_recipe(bad)
    msg = str(e.value)
    assert "5 error(s)" in msg and "validate.colour" in msg
    assert "gate 'passkey@32768 >= 0.5' names length 32768; the run scores passkey at 8192, 16384" in msg
    assert "gate 'ppl@0-4096 <= 1.05x base' names perplexity bucket 0-4096" in msg and "make 0-8192, 8192-16384" in msg
    assert "gate 'ruler@8192 >= 0.5' needs a RULER task" in msg
    assert "gate 'passkey@8192 >= 0.9' cannot hold with n = 5 samples" in msg and "n >= 35" in msg
    # gates apply to release runs: the release section's lengths are the ones that count
    ok = tmp_path / "ok.yaml"
    ok.write_text(yaml.safe_dump({
        "name": "ok", "source": str(tmp_path / "not-here"), "target_length": 32768,
        "validate": {"tasks": ["passkey", "ppl"], "lengths": [8192], "limit": 1,
                     "gates": ["passkey-multi@32768 >= 0.9", "ppl@0-4096 <= 1.05x base"],
                     "release": {"tasks": ["passkey-multi", "ppl"], "lengths": [4096, 32768], "limit": 5}}}))
    assert load_recipe(ok).validate_.resolved(True).lengths == [4096, 32768]
    # a bucket split at the base's window: read from the source where it is here (a HF config's
    # max_position_embeddings), one common split point where it is not
    split = {"name": "split", "source": str(src), "target_length": 32768,
             "validate": {"tasks": ["ppl"], "lengths": [4096, 16384], "gates": ["ppl@8192-16384 <= 0.5x base"]}}
    (tmp_path / "split.yaml").write_text(yaml.safe_dump(split))
    load_recipe(tmp_path / "split.yaml")
    (src / "config.json").write_text('{"max_position_embeddings": 12288}')
    with pytest.raises(ConvertError, match=r"bucket 8192-16384.*split at the base's window 12288"):
        load_recipe(tmp_path / "split.yaml")
    split["source"] = str(tmp_path / "elsewhere")  # not on this machine: any one split point
    split["validate"]["gates"] = ["ppl@8192-16384 <= 0.5x base", "ppl@4096-8192 <= 1.1x base"]
    (tmp_path / "split.yaml").write_text(yaml.safe_dump(split))
    load_recipe(tmp_path / "split.yaml")
    split["validate"]["gates"].append("ppl@4096-12288 <= 1.1x base")
    (tmp_path / "split.yaml").write_text(yaml.safe_dump(split))
    with pytest.raises(ConvertError, match="split perplexity buckets at several positions"):
        load_recipe(tmp_path / "split.yaml")
