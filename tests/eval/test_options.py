"""EvalOptions checks itself where it is built, so the demo and scripts get the checks the CLI gets."""

from pathlib import Path

import pytest

from gqa_uptrain.errors import ConfigError
from gqa_uptrain.eval import runner
from gqa_uptrain.eval.cli import SECTIONS, build_parser, evaluate_flags
from gqa_uptrain.eval.options import EvalOptions

VALID = {"base": "base", "models": ["gqa"], "output": Path("out"), "tasks": "gqa_lastword"}


@pytest.mark.parametrize("field,value,message", [
    ("batch_size", 0, "--batch-size must be at least 1, got 0"),
    ("num_fewshot", -1, "--num-fewshot must be at least 0, got -1"),
    ("limit", 0, "--limit must be positive, got 0"),
    ("speed_batch_sizes", [4, 0], "--speed-batch-sizes must be at least 1, got 0"),
    ("speed_contexts", [], "--speed-contexts: List should have at least 1 item"),
    ("perplexity_stride", 0, "--perplexity-stride must be at least 1, got 0"),
    ("dtype", "fp8", "--dtype: Input should be 'auto', 'float32', 'bfloat16' or 'float16'"),
    ("bogus", 1, "unknown option 'bogus'"),
])
def test_bad_values_are_refused_in_one_line_naming_the_flag(field, value, message):
    with pytest.raises(ConfigError) as error:
        EvalOptions(**{**VALID, field: value})
    assert str(error.value).startswith(message) and "\n" not in str(error.value)


def test_nothing_to_measure_is_refused():
    with pytest.raises(ConfigError, match="^nothing to measure: give --tasks, --perplexity and/or --speed$"):
        EvalOptions(**{**VALID, "tasks": None})


def test_options_are_typed_and_frozen():
    options = EvalOptions(**{**VALID, "output": "out", "limit": 0.5, "cache_dir": "cache"})
    assert options.output == Path("out") and options.cache_dir == Path("cache") and options.limit == 0.5
    documents = EvalOptions(**{**VALID, "limit": 6}).limit
    assert documents == 6 and isinstance(documents, int)  # an int limit counts documents, a float is a fraction
    with pytest.raises(ValueError):
        options.batch_size = 1


def test_the_cli_builds_the_same_options_and_adds_no_check_of_its_own(monkeypatch):
    given = []
    monkeypatch.setattr(runner, "run_report", lambda options: (given.append(options), ({}, []))[1])
    args = build_parser().parse_args(["--base", "base", "--model", "gqa", "--output", "out", "--tasks", "gqa_lastword",
                                      "--device", "cpu"])
    evaluate_flags(args)  # the flags through the Python API, as gqa-eval runs them
    assert given == [EvalOptions(**VALID, device="cpu")]
    args = build_parser().parse_args(["--base", "base", "--output", "out", "--speed", "--speed-batch-sizes", "0"])
    with pytest.raises(ConfigError, match="--speed-batch-sizes must be at least 1, got 0"):
        evaluate_flags(args)
    assert len(given) == 1


def test_a_bad_flag_value_is_one_error_line(gqa_eval, eval_args, tiny_llama, tmp_path, capsys):
    args = eval_args(tiny_llama, [], tmp_path / "out", tmp_path / "cache", "--tasks", "gqa_lastword",
                     "--num-fewshot", "-2")
    assert gqa_eval(args) == 2
    assert capsys.readouterr().err.strip() == "gqa-eval: error: --num-fewshot must be at least 0, got -2"


def test_every_option_has_one_flag_in_one_help_section():
    listed = [field for fields in SECTIONS.values() for field in fields]
    assert sorted(listed) == sorted(EvalOptions.model_fields)
