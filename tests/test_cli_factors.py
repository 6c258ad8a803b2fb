"""`dprope factors`: the calculator on the command line."""

import json

import pytest
from click.testing import CliRunner

from convert.cli import main
from test_engine import GOLDEN_16K, GOLDEN_8K

LLAMA2 = ["factors", "--method", "dprope-paper", "--rope-theta", "10000", "--head-dim", "128", "--original-length", "4096"]


@pytest.mark.parametrize("target,golden", [(8192, GOLDEN_8K), (16384, GOLDEN_16K)])
def test_json_interpolates_the_golden_pairs(target, golden):
    res = CliRunner().invoke(main, [*LLAMA2, "--target-length", str(target), "--json"])
    assert res.exit_code == 0, res.output
    d = json.loads(res.output)
    assert {i for i, c in enumerate(d["chosen"]) if c == "interpolation"} == golden
    assert {i for i, f in enumerate(d["factors"]) if f != 1.0} == golden
    assert set(d["disturbance"]) == {"selected", "extrapolation", "interpolation"}
    assert len(d["per_pair"]["extrapolation"]) == 64 and len(d["inv_freq"]) == 64
    assert d["params"]["target_length"] == target and d["params"]["bins"] == 360


def test_table_and_plot(tmp_path):
    png = tmp_path / "f.png"
    res = CliRunner().invoke(main, [*LLAMA2, "--target-length", "8192", "--plot", str(png)])
    assert res.exit_code == 0, res.output
    assert "interpolation: 47 pairs [2-6, 8-10, 15-19, 28, 30-44, 46-63]" in res.output
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 20_000


def test_options_reach_the_engine():
    res = CliRunner().invoke(main, [*LLAMA2, "--target-length", "8192", "--select", "top-n:40", "--json",
                                    "--candidates", "extrapolation,interpolation,yarn", "--bins", "180"])
    assert res.exit_code == 0, res.output
    d = json.loads(res.output)
    assert sum(c != "extrapolation" for c in d["chosen"]) == 40
    assert d["params"]["candidates"] == ["extrapolation", "interpolation", "yarn"] and d["params"]["bins"] == 180


def test_model_option_reads_a_checkpoint(tiny_models):
    res = CliRunner().invoke(main, ["factors", "--model", str(tiny_models[("qwen2", True)]), "--target-length", "256",
                                    "--json"])
    assert res.exit_code == 0, res.output
    d = json.loads(res.output)
    assert d["params"]["original_length"] == 64 and d["params"]["head_dim"] == 16


@pytest.mark.parametrize("args,msg", [
    (["--target-length", "8192"], "--rope-theta"),
    ([*LLAMA2[1:], "--target-length", "2048"], "not longer than"),
    (["--rope-theta", "1e4", "--head-dim", "127", "--original-length", "64", "--target-length", "128"], "even"),
    ([*LLAMA2[1:], "--target-length", "8192", "--bins", "1"], "bins"),
    ([*LLAMA2[1:], "--target-length", "8192", "--select", "best"], "unknown selection"),
    (["--model", "/nonexistent/dir", "--target-length", "8192"], "does not exist"),
])
def test_errors_are_one_line(args, msg):
    res = CliRunner().invoke(main, ["factors", *args])
    assert res.exit_code == 2 and msg in res.output and "Traceback" not in res.output


def test_default_method_and_methods_listing():
    res = CliRunner().invoke(main, ["factors", "--rope-theta", "1e5", "--head-dim", "64", "--original-length", "8192",
                                    "--target-length", "16384", "--json"])
    assert res.exit_code == 0, res.output
    d = json.loads(res.output)
    from dprope.methods import DEFAULT_METHOD

    assert d["method"] == DEFAULT_METHOD and d["params"]["options"]
    listing = CliRunner().invoke(main, ["methods"])
    assert listing.exit_code == 0
    from dprope.methods import available_methods

    for name in available_methods():
        assert any(line.split()[0] == name for line in listing.output.splitlines() if line.strip()), name
    assert "(default)" in listing.output
    js = json.loads(CliRunner().invoke(main, ["methods", "--json"]).output)
    assert {m["name"] for m in js} == set(available_methods())


def test_method_options_on_the_command_line():
    res = CliRunner().invoke(main, ["factors", "--method", "yarn", "--opt", "temperature=1.25", "--rope-theta", "1e4",
                                    "--head-dim", "64", "--original-length", "4096", "--target-length", "8192",
                                    "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.output)["temperature"] == 1.25
    bad = CliRunner().invoke(main, ["factors", "--method", "yarn", "--opt", "guard=3", "--rope-theta", "1e4",
                                    "--head-dim", "64", "--original-length", "4096", "--target-length", "8192"])
    assert bad.exit_code == 2 and "no option(s) guard" in bad.output
    bad = CliRunner().invoke(main, ["factors", "--method", "yarn", "--select", "top-n:3", "--rope-theta", "1e4",
                                    "--head-dim", "64", "--original-length", "4096", "--target-length", "8192"])
    assert bad.exit_code == 2 and "does not apply" in bad.output
