"""Bad input: one clear error before any work, and nothing written or overwritten."""

import shutil

import pytest
from transformers import AutoTokenizer

from gqa_uptrain.errors import ConfigError, DataError
from gqa_uptrain.train.cli import main
from gqa_uptrain.train.loop import run
from gqa_uptrain.train.recipe import load_recipe

from .conftest import TINY_RECIPE, overrides, run_cli


def recipe(model, text, output, *extra):
    return load_recipe(TINY_RECIPE, overrides(model, text, output, *extra))


def test_empty_dataset(tmp_path, tiny_llama_gqa2, fresh_accelerate):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(DataError):
        run(recipe(tiny_llama_gqa2, empty, tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_sequence_longer_than_the_model_allows(tmp_path, tiny_llama_gqa2, shakespeare):
    with pytest.raises(ConfigError, match=r"data.seq_len=512 is above the model's limit of 256"):
        run(recipe(tiny_llama_gqa2, shakespeare, tmp_path / "out", "data.seq_len=512"))
    assert not (tmp_path / "out").exists()


def test_budget_below_one_step(tmp_path, tiny_llama_gqa2, shakespeare, fresh_accelerate):
    with pytest.raises(ConfigError, match="smaller than one optimizer step"):
        run(recipe(tiny_llama_gqa2, shakespeare, tmp_path / "out", "budget.steps=null", "budget.tokens=100"))
    assert not (tmp_path / "out").exists()


def test_teacher_with_another_tokenizer(tmp_path, tiny_llama, tiny_llama_gqa2, shakespeare, fresh_accelerate):
    teacher = tmp_path / "teacher"
    shutil.copytree(tiny_llama, teacher)
    tokenizer = AutoTokenizer.from_pretrained(teacher)
    tokenizer.add_tokens(["<|other|>"])
    tokenizer.save_pretrained(teacher)
    with pytest.raises(ConfigError, match="different tokenizer"):
        run(recipe(tiny_llama_gqa2, shakespeare, tmp_path / "out", f"teacher.path={teacher}"))
    assert not (tmp_path / "out").exists()


def test_output_dir_of_another_recipe_is_left_alone(tmp_path, tiny_llama_gqa2, shakespeare, fresh_accelerate):
    output = tmp_path / "out"
    run(recipe(tiny_llama_gqa2, shakespeare, output, "budget.steps=2", "eval.batches=1"))
    before = {p: p.stat().st_mtime_ns for p in output.rglob("*")}
    with pytest.raises(ConfigError, match=r"different recipe \(differs in train.lr\)"):
        run(recipe(tiny_llama_gqa2, shakespeare, output, "budget.steps=2", "eval.batches=1", "train.lr=0.1"))
    assert {p: p.stat().st_mtime_ns for p in output.rglob("*")} == before


def test_output_dir_holding_something_else(tmp_path, tiny_llama_gqa2, shakespeare, fresh_accelerate):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="holds no gqa-uptrain run"):
        run(recipe(tiny_llama_gqa2, shakespeare, tmp_path / "out"))
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["notes.txt"]


def test_cli_prints_one_line_and_exits_2(tmp_path, tiny_llama_gqa2, shakespeare, capsys):
    with pytest.raises(SystemExit) as exit:
        main([str(TINY_RECIPE), *overrides(tiny_llama_gqa2, shakespeare, tmp_path / "out"), "train.nope=1"])
    assert exit.value.code == 2
    assert capsys.readouterr().err.splitlines() == [f"gqa-uptrain: error: {TINY_RECIPE}: train.nope: unknown key"]


def test_cli_dry_run_prints_the_plan_and_writes_nothing(
    tmp_path, tiny_llama_gqa2, shakespeare, capsys, fresh_accelerate
):
    code = main([str(TINY_RECIPE), *overrides(tiny_llama_gqa2, shakespeare, tmp_path / "out"),
                 "budget.steps=null", "budget.fraction=0.5", "budget.pretrain_tokens=1e5", "--dry-run"])
    assert code == 0
    out = capsys.readouterr().out
    assert "optimizer steps      390 (gradient accumulation 2)" in out
    assert "49.9200% of its tokens" in out  # floor(50,000 / 128) steps
    assert not (tmp_path / "out").exists()


def test_module_entry_point_and_help():
    result = run_cli("--help")
    assert result.returncode == 0
    for flag in ("recipe", "key=value", "--dry-run", "accelerate launch"):
        assert flag in result.stdout
