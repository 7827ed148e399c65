"""The tiny model learns, the result is a loadable HF folder with provenance, and a finished run is not redone."""

import json
import shutil

import pytest
import torch
from transformers import AutoModelForCausalLM

from gqa_uptrain.train.loop import run
from gqa_uptrain.train.recipe import load_recipe

from .conftest import TINY_RECIPE, overrides


def records(output):
    return [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_tiny_model_learns_and_exports(tmp_path, tiny_llama_gqa2, shakespeare, fresh_accelerate):
    model = tmp_path / "converted"
    shutil.copytree(tiny_llama_gqa2, model)
    (model / "gqa_provenance.json").write_text(json.dumps({"source_model": "tiny-mha", "num_key_value_heads": 2}))
    output = tmp_path / "run"
    extra = ("budget.steps=24", "log.trackers=[tensorboard]")
    recipe = load_recipe(TINY_RECIPE, overrides(model, shakespeare, output, *extra))

    result = run(recipe)
    target = result.model

    history = records(output)
    losses = [r["loss"] for r in history if "loss" in r]
    val = [r["val_loss"] for r in history if "val_loss" in r]
    assert losses[-1] < losses[0] - 2.0, losses  # from ~10.8 (uniform over 50k tokens) well down
    assert val[-1] < val[0] - 1.0, val
    assert all("grad_norm" in r and "tokens_per_s" in r and "lr" in r for r in history if "loss" in r)
    assert history[-1]["tokens"] == 24 * 4 * 32
    assert history[0]["step"] == 0 and history[0]["tokens"] == 0 and "val_loss" in history[0]  # the converted model
    assert [r["step"] for r in history if "val_loss" in r] == [0, 10, 20, 24]  # tiny-cpu.yaml: eval.every=10

    trained = AutoModelForCausalLM.from_pretrained(target)
    assert trained.config.num_key_value_heads == 2
    assert trained.config.use_cache  # training turned it off; the export gives back the source's setting
    original = AutoModelForCausalLM.from_pretrained(tiny_llama_gqa2)
    k_proj = [m.model.layers[0].self_attn.k_proj.weight for m in (trained, original)]
    assert not torch.equal(*k_proj)
    assert (target / "model.safetensors").is_file() and (target / "tokenizer.json").is_file()
    provenance = json.loads((target / "gqa_provenance.json").read_text())
    assert provenance["source_model"] == "tiny-mha"  # carried forward from the converter
    assert provenance["uptraining"]["tokens"] == 24 * 4 * 32 and provenance["uptraining"]["steps"] == 24
    assert provenance["uptraining"]["final_val_loss"] == val[-1]
    # the call returns what it wrote: the record, and the figures callers read from it and from the history
    assert target == output / "model" and result.provenance == provenance
    assert (result.steps, result.tokens, result.final_val_loss) == (24, 24 * 4 * 32, val[-1])
    assert result.final_loss == losses[-1]
    assert (output / "loss_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert list((output / "logs").rglob("events.out.tfevents.*"))
    assert sorted(p.name for p in (output / "checkpoints").iterdir()) == ["step-00000020", "step-00000024"]

    # The same command again finds the finished run and changes nothing.
    before = (target / "model.safetensors").stat().st_mtime_ns
    assert run(recipe) == result  # read from the folder this time: the same as the run returned
    assert (target / "model.safetensors").stat().st_mtime_ns == before


@pytest.mark.slow
def test_distillation_from_the_original_model(tmp_path, tiny_llama, tiny_llama_gqa2, shakespeare, fresh_accelerate):
    output = tmp_path / "distilled"
    recipe = load_recipe(
        TINY_RECIPE,
        overrides(tiny_llama_gqa2, shakespeare, output, "budget.steps=10", f"teacher.path={tiny_llama}",
                  "teacher.weight=1.0", "teacher.temperature=2.0", "log.every=2"),
    )
    run(recipe)
    kd = [r["kd_loss"] for r in records(output) if "kd_loss" in r]
    assert len(kd) == 5 and kd[-1] < kd[0] * 0.7, kd  # the student moves toward the teacher's distributions
    provenance = json.loads((output / "model" / "gqa_provenance.json").read_text())
    assert provenance["uptraining"]["teacher"] == str(tiny_llama)


@pytest.mark.slow
def test_the_teachers_validation_loss_is_the_reference(tmp_path, tiny_llama_gqa2, shakespeare, fresh_accelerate,
                                                       capsys):
    """Measured once, at step 0, on the validation batches the student is measured on: with the model itself as the
    teacher it is exactly the start, so there is no gap, and every validation line says so."""
    output = tmp_path / "run"
    recipe = load_recipe(TINY_RECIPE, overrides(tiny_llama_gqa2, shakespeare, output, "budget.steps=2",
                                                f"teacher.path={tiny_llama_gqa2}", "eval.every=1"))
    run(recipe)
    history = records(output)
    assert history[0]["reference_val_loss"] == pytest.approx(history[0]["val_loss"], rel=1e-6)
    assert sum("reference_val_loss" in r for r in history) == 1
    lines = [line for line in capsys.readouterr().out.splitlines() if " val_loss " in line]
    assert [line.split()[1] for line in lines] == ["0/2", "1/2", "2/2"]
    start, reference = history[0]["val_loss"], history[0]["reference_val_loss"]
    assert all(line.endswith(f"recovered nothing, there is no gap: the start {start:.4f} is not above the teacher's "
                             f"{reference:.4f}") for line in lines)


def test_distillation_loss_is_zero_for_identical_logits_and_positive_otherwise():
    from gqa_uptrain.train.distill import distillation_loss, mix

    logits = torch.randn(2, 5, 11)
    assert distillation_loss(logits, logits, 2.0).item() < 1e-6
    assert distillation_loss(logits, torch.randn(2, 5, 11), 2.0).item() > 0.1
    assert mix(torch.tensor(2.0), torch.tensor(4.0), 0.25).item() == 2.5
