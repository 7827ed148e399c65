"""What gqa-convert says beside the conversion: the method's word, no-op and tensor-parallel warnings, and how to
measure the damage afterwards."""

from pathlib import Path

import pytest

from gqa_uptrain.convert.cli import main
from gqa_uptrain.convert.options import ConvertOptions
from gqa_uptrain.convert.messages import splits_over
from gqa_uptrain.convert.plan import build_plan
from gqa_uptrain.errors import InvalidGroupsError
from tiny_models import random_model, twelve_head_llama


@pytest.fixture
def source(tmp_path) -> Path:
    path = tmp_path / "tiny"
    random_model("llama", kv_heads=4).save_pretrained(path)
    return path


@pytest.fixture
def twelve_heads(tmp_path) -> Path:
    path = tmp_path / "twelve"
    twelve_head_llama().save_pretrained(path)
    return path


def run(*argv) -> None:
    main([str(a) for a in argv])


@pytest.mark.parametrize(("method", "word"), [("mean", "mean-pooled"), ("first", "cut to each group's first head"),
                                              ("random", "drawn afresh")])
def test_dry_run_names_what_the_method_does(source, tmp_path, capsys, method, word):
    run(source, "-g", 1, "--method", method, "-o", tmp_path / "out", "--dry-run")
    out = capsys.readouterr().out
    assert f"tensors       4 {word}," in out and "pooled" not in out.replace("mean-pooled", "")


def test_random_at_the_source_kv_heads_is_refused(source, tmp_path, capsys):
    with pytest.raises(SystemExit):
        run(source, "-g", 4, "--method", "random", "-o", tmp_path / "out")
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "would copy the source unchanged" in err and not (tmp_path / "out").exists()


def test_other_methods_at_the_source_kv_heads_say_nothing_changes(source, tmp_path, capsys):
    run(source, "-g", 4, "-o", tmp_path / "out", "--dry-run")
    assert "nothing changes, the output is a copy of the source" in capsys.readouterr().out


def test_after_writing_it_says_how_to_measure(source, tmp_path, capsys):
    out = tmp_path / "mqa"
    run(source, "-g", 1, "-o", out)
    text = capsys.readouterr().out
    assert f"measure it: gqa-eval --base {source} --model {out} --perplexity TEXT" in text
    assert "mean pooling can lose much" in text and "--method calibrated keeps more" in text


def test_tensor_parallel_warning_names_groups_that_would_shard(twelve_heads, tmp_path, capsys):
    run(twelve_heads, "-g", 3, "-o", tmp_path / "out", "--dry-run")
    lines = [line for line in capsys.readouterr().out.splitlines() if "tensor parallel" in line]
    assert lines == ["warning: tensor parallel: 3 KV heads do not shard over 2 or 4 GPUs; --groups 1 or 2 would"]
    run(twelve_heads, "-g", 2, "-o", tmp_path / "out2", "--dry-run")
    assert "tensor parallel" not in capsys.readouterr().out


def test_splits_over():
    assert splits_over(8, 4) and splits_over(2, 8) and splits_over(1, 8)
    assert not splits_over(3, 2) and not splits_over(6, 4)


def test_plan_accepts_random_at_full_heads_but_the_api_refuses(source, tmp_path):
    assert build_plan(source, ConvertOptions(source=str(source), groups=4, method="random")).layout.changes == ()
    from gqa_uptrain.convert import convert_checkpoint

    with pytest.raises(InvalidGroupsError):
        convert_checkpoint(source, 4, tmp_path / "o", method="random", say=None)
