"""The Python API as a notebook uses it: convert -> uptrain -> evaluate, each one call, no CLI."""

from pathlib import Path

import pytest
from transformers import AutoConfig, AutoModelForCausalLM

from gqa_uptrain.convert import convert_checkpoint
from gqa_uptrain.errors import ConfigError, GqaError, InvalidGroupsError
from gqa_uptrain.eval import evaluate
from gqa_uptrain.train import load, uptrain
from gqa_uptrain.train.loop import reset_accelerate_state


def tiny_recipe(model: Path, text: Path, output: Path) -> dict:
    return {
        "output_dir": str(output), "model": {"path": str(model)},
        "data": {"train": {"path": str(text)}, "holdout_docs": 20, "seq_len": 32},
        "batch": {"micro_batch": 2, "global_batch": 4},
        "train": {"lr": 3e-3, "precision": "fp32"}, "budget": {"steps": 2},
        "checkpoint": {"every": 2}, "eval": {"every": 2, "batches": 1}, "log": {"every": 1, "trackers": []},
    }


@pytest.mark.slow
def test_convert_uptrain_evaluate(tiny_llama, shared_data, tmp_path):
    text = tmp_path / "text.txt"
    text.write_text((shared_data / "tinyshakespeare.txt").read_text()[:40_000])
    lines: list[str] = []
    gqa = convert_checkpoint(tiny_llama, 2, tmp_path / "gqa2", progress=False, say=lines.append)
    assert AutoConfig.from_pretrained(gqa).num_key_value_heads == 2
    assert f"measure it: gqa-eval --base {tiny_llama} --model {gqa} --perplexity TEXT" in lines[0]
    recipe = tiny_recipe(gqa, text, tmp_path / "run")
    try:
        model = uptrain(recipe, ["train.lr=1e-3"])
    finally:
        reset_accelerate_state()
    assert model == tmp_path / "run" / "model" and AutoModelForCausalLM.from_pretrained(model) is not None
    assert recipe["train"]["lr"] == 3e-3  # the caller's dict is left as it was
    report = evaluate(tiny_llama, [gqa, model], perplexity=str(text), perplexity_max_tokens=256, batch_size=2,
                      device="cpu", output=tmp_path / "report", use_cache=False)
    assert (tmp_path / "report" / "report.json").is_file()
    assert [c["label"] for c in report["candidates"]] == ["gqa2", "run"]
    assert "perplexity" in str(report["comparisons"]["run"])


def test_api_errors_are_the_project_classes(tiny_llama, tmp_path):
    with pytest.raises(InvalidGroupsError):
        convert_checkpoint(tiny_llama, 3, tmp_path / "x", progress=False, say=None)
    with pytest.raises(GqaError, match="apply to --method calibrated only"):
        convert_checkpoint(tiny_llama, 2, tmp_path / "x", calibration="books.txt", say=None)
    with pytest.raises(ConfigError, match="batch.micro_batch: missing"):
        load({**tiny_recipe(tiny_llama, tmp_path, tmp_path), "batch": {"global_batch": 4}})
    with pytest.raises(ConfigError, match="nothing to measure"):
        evaluate(tiny_llama, [tiny_llama], device="cpu")


def test_dry_run_returns_the_folder_and_writes_nothing(tiny_llama, tmp_path):
    lines: list[str] = []
    out = convert_checkpoint(tiny_llama, 1, tmp_path / "mqa", dry_run=True, say=lines.append)
    assert out == tmp_path / "mqa" and not out.exists() and "KV heads      4 -> 1" in lines[0]
