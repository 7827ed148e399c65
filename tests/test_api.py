"""The Python API as a notebook uses it: convert -> uptrain -> evaluate, each one call, no CLI, each returning what
it wrote."""

import json
import math
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
    converted = convert_checkpoint(tiny_llama, 2, tmp_path / "gqa2", progress=False, say=lines.append)
    gqa = converted.output
    assert gqa == tmp_path / "gqa2" and AutoConfig.from_pretrained(gqa).num_key_value_heads == 2
    assert converted.provenance == json.loads((gqa / "gqa_provenance.json").read_text())
    assert (converted.method, converted.kv_heads_before, converted.kv_heads_after) == ("mean", 4, 2)
    assert converted.provenance["conversion"]["kv_heads_after"] == 2 and not converted.dry_run
    assert f"measure it: gqa-eval --base {tiny_llama} --model {gqa} --perplexity TEXT" in lines[0]
    recipe = tiny_recipe(gqa, text, tmp_path / "run")
    try:
        trained = uptrain(recipe, ["train.lr=1e-3"])
    finally:
        reset_accelerate_state()
    model = trained.model
    assert model == tmp_path / "run" / "model" and AutoModelForCausalLM.from_pretrained(model) is not None
    assert trained.provenance == json.loads((model / "gqa_provenance.json").read_text())
    assert trained.provenance["conversion"] == converted.provenance["conversion"]  # carried forward
    history = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert (trained.steps, trained.tokens) == (2, 2 * 4 * 32) == (history[-1]["step"], history[-1]["tokens"])
    assert trained.final_loss == [r["loss"] for r in history if "loss" in r][-1]
    assert trained.final_val_loss == [r["val_loss"] for r in history if "val_loss" in r][-1]
    assert recipe["train"]["lr"] == 3e-3  # the caller's dict is left as it was
    report = evaluate(tiny_llama, [gqa, model], perplexity=str(text), perplexity_max_tokens=256, batch_size=2,
                      device="cpu", output=tmp_path / "report", use_cache=False)
    written = json.loads((tmp_path / "report" / "report.json").read_text())
    assert report.files[0] == tmp_path / "report" / "report.json" and report.folder == tmp_path / "report"
    assert all(path.is_file() for path in report.files)
    assert written == json.loads(json.dumps(report.report, default=str))  # what report.json holds, for JSON users
    assert [c.label for c in report.candidates] == ["gqa2", "run"] and report.base.ref == str(tiny_llama)
    for entry, candidate in zip(written["candidates"], report.candidates):
        assert candidate.perplexity == entry["perplexity"]["token_perplexity"] and candidate.error is None
        assert candidate.kv_cache_bytes_per_token == entry["kv_cache_bytes_per_token"]
    assert report.model(tmp_path / "run" / ".." / "run" / "model").label == "run"  # the same folder, however written
    assert report.base.kv_cache_bytes_per_token == 2 * report.model(gqa).kv_cache_bytes_per_token  # 4 -> 2 KV heads
    perplexity = next(row for row in report.deltas("run") if row["task"] == "perplexity")
    assert perplexity == next(row for row in written["comparisons"]["run"] if row["task"] == "perplexity")
    assert perplexity["candidate_value"] == report.model(model).perplexity


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
    planned = convert_checkpoint(tiny_llama, 1, tmp_path / "mqa", dry_run=True, say=lines.append)
    assert planned.output == tmp_path / "mqa" and not planned.output.exists() and "KV heads      4 -> 1" in lines[0]
    assert planned.dry_run and planned.provenance is None
    assert (planned.method, planned.kv_heads_before, planned.kv_heads_after) == ("mean", 4, 1)


def test_a_failed_candidate_raises_with_the_others_results_and_a_failed_base_with_none(tiny_llama, tmp_path):
    """EvaluationError's `report` is what `evaluate` would have returned: the failed candidate's error and the
    others' results, as report.json holds them; when the base fails (it is measured first) there is none."""
    import torch
    from safetensors.torch import load_file, save_file

    from gqa_uptrain.errors import EvaluationError

    text = tmp_path / "text.txt"
    text.write_text("It was the best of times, it was the worst of times, it was the age of wisdom. " * 20)
    broken = tmp_path / "diverged"
    broken.mkdir()
    for path in tiny_llama.iterdir():
        (broken / path.name).write_bytes(path.read_bytes())
    weights = load_file(broken / "model.safetensors")
    weights["model.norm.weight"] = torch.full_like(weights["model.norm.weight"], float("nan"))
    save_file(weights, broken / "model.safetensors", metadata={"format": "pt"})
    options = {"perplexity": str(text), "perplexity_max_tokens": 64, "device": "cpu", "use_cache": False}

    with pytest.raises(EvaluationError, match="1 of 2 candidates failed") as failed:
        evaluate(tiny_llama, [broken, tiny_llama], output=tmp_path / "report", **options)
    report = failed.value.report
    written = json.loads((tmp_path / "report" / "report.json").read_text())
    assert report.folder == tmp_path / "report" and [c.ref for c in report.candidates] == [str(broken), str(tiny_llama)]
    assert report.model(broken).error == written["candidates"][0]["error"]
    assert "not a finite number" in report.model(broken).error
    assert math.isnan(report.model(broken).perplexity)  # measured, then refused: kept, as report.json keeps it
    assert report.candidates[1].error is None and report.candidates[1].perplexity == report.base.perplexity

    with pytest.raises(EvaluationError, match="not a finite number") as failed:
        evaluate(broken, [tiny_llama], output=tmp_path / "report-2", **options)
    assert failed.value.report is None
