"""The one KEY=VALUE parser (convert/options.py) behind --opt, --fitness specs and the benchmarks' method specs."""

import pytest

from convert.errors import ConvertError
from convert.evaluate.fitness import FitnessSpec
from convert.options import parse_key_values, parse_spec


def test_values_are_yaml_scalars_and_lists():
    got = parse_key_values(["n=3", "x=0.5", "flag=true", "ls=[1, 2]", "name=yarn", "empty="], "--opt", "--opt a=1")
    assert got == {"n": 3, "x": 0.5, "flag": True, "ls": [1, 2], "name": "yarn", "empty": None}


def test_none_words_but_not_for_temperature():
    got = parse_key_values(["window=none", "temperature=none"], "--opt", "--opt a=1", none_words=True)
    assert got == {"window": None, "temperature": "none"}


@pytest.mark.parametrize("bad", ["novalue", "=3"])
def test_bad_pair_names_the_fix(bad):
    with pytest.raises(ConvertError, match=r"is not KEY=VALUE \(e.g. --opt a=1\)"):
        parse_key_values([bad], "--opt", "--opt a=1")


def test_spec_and_its_users():
    assert parse_spec("dprope-ramp:temperature=yarn:low=0.001", "method", "m:k=v") == (
        "dprope-ramp", {"temperature": "yarn", "low": 0.001})
    assert dict(FitnessSpec.parse("proxy:samples=2").options)["samples"] == 2
    with pytest.raises(ConvertError, match="is not KEY=VALUE"):
        FitnessSpec.parse("proxy:samples")
