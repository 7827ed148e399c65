"""The dry run's memory and time estimate: its arithmetic on a tiny config, and its error against measurements."""

from pathlib import Path

import pytest
from transformers import LlamaConfig

from gqa_uptrain.errors import ConfigError
from gqa_uptrain.kv_heads import with_kv_heads
from gqa_uptrain.train.cli import main
from gqa_uptrain.train.estimate import (GIB, Setup, Shape, accelerate_config_file, estimate_memory, gib, gpus_to_fit,
                                        largest_micro_batch, peak, training_seconds)

from .conftest import REPO, overrides, run_cli


def test_arithmetic_on_a_tiny_config():
    shape = Shape(params=1000, layers=2, hidden=8, kv_width=4, intermediate=16, vocab=10)
    tokens = 2 * 3  # micro-batch x seq
    per_layer = (36 * 8 + 6 * 4 + 8 * 16) * tokens
    one = estimate_memory(shape, 2, 3, "single", 1)
    assert (one.weights, one.gradients, one.optimizer, one.bf16_weights) == (4000, 4000, 8000, 2000)
    assert one.activations == 2 * per_layer
    assert one.activations_checkpointed == 4 * 8 * tokens * 2 + per_layer
    assert one.logits == 10 * 10 * tokens and one.teacher == 0
    fsdp = estimate_memory(shape, 2, 3, "fsdp", 4, teacher=shape, teacher_sharded=True)
    assert (fsdp.weights, fsdp.optimizer, fsdp.bf16_weights, fsdp.teacher) == (1000, 2000, 2000, 500)
    assert fsdp.logits == 18 * 10 * tokens
    assert training_seconds(2 * 989.4e12 * 0.5, "h100", 2, mfu=0.5) == pytest.approx(1.0)
    with pytest.raises(ConfigError, match="unknown GPU"):
        peak("v100")


def test_against_the_measured_runs():
    """Issue 13's measurements: a 1.34B MHA Llama converted to GQA-4 (1.175B parameters), seq 2048, micro-batch 8,
    bf16, eager, on H200s: 70.0 GiB on one GPU, 54.6 GiB per GPU under FSDP2 on two. The estimate is 67.8 GiB
    (-3.2%) and 57.0 GiB (+4.4%): within 5% both ways."""
    config = LlamaConfig(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                         num_key_value_heads=4, vocab_size=50257, tie_word_embeddings=False)
    shape = Shape.of(config)
    assert shape.params == 1_174_829_056
    one = estimate_memory(shape, 8, 2048, "single", 1).total(checkpointing=False) / GIB
    two = estimate_memory(shape, 8, 2048, "fsdp", 2).total(checkpointing=False) / GIB
    assert one == pytest.approx(70.0, rel=0.05) and one == pytest.approx(67.8, abs=0.05)
    assert two == pytest.approx(54.6, rel=0.05) and two == pytest.approx(57.0, abs=0.05)
    assert gpus_to_fit(shape, 8, 2048, 23.6 * GIB, checkpointing=False) is None  # activations alone exceed a 4090
    assert gpus_to_fit(shape, 8, 2048, 23.6 * GIB, checkpointing=True) == 2  # 21.2 GiB each


@pytest.mark.slow
def test_dry_run_prints_the_estimate(tiny_llama_gqa2, shared_data, tmp_path):
    result = run_cli(str(REPO / "recipes" / "tiny-cpu.yaml"), *overrides(
        tiny_llama_gqa2, shared_data / "tinyshakespeare.txt", tmp_path / "run"), "--dry-run",
        "--num-processes", "2", "--gpu", "4090", "--parallel", "fsdp")
    assert result.returncode == 0, result.stderr
    assert "memory per GPU       fsdp over 2 process(es), micro-batch 2 x 32" in result.stdout
    assert "x 4090 (23.6 GiB)" in result.stdout and "at 40% MFU" in result.stdout
    assert not (tmp_path / "run").exists()


# -- the dry run from the recipe file: before the conversion, on N processes, by the recipe's accelerate config ----

PAPER_RECIPE = REPO / "recipes" / "llama-2-7b-gqa8.yaml"  # FSDP, global batch 1,024, micro-batch 2, 8 KV heads


@pytest.fixture(scope="module")
def llama_7b_config(tmp_path_factory) -> Path:
    """A Llama-2-7B-shaped source: config.json alone (no weights, no tokenizer), as a dry run needs."""
    folder = tmp_path_factory.mktemp("llama-2-7b")
    LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                vocab_size=32000, max_position_embeddings=4096, dtype="float16").save_pretrained(folder)
    return folder


def dry_run_lines(capsys, recipe: Path, *argv: str) -> list[str]:
    assert main([str(recipe), *argv, "--dry-run"]) == 0
    return capsys.readouterr().out.splitlines()


def test_dry_run_plans_from_the_source_before_converting(llama_7b_config, tmp_path, capsys, monkeypatch):
    """No converted folder, no tokenizer: the plan is the converted config's (8 KV heads), on the processes asked
    for, under the recipe's FSDP config."""
    monkeypatch.chdir(REPO)  # where the recipe's relative accelerate_config is
    lines = dry_run_lines(capsys, PAPER_RECIPE, f"convert.source={llama_7b_config}", f"model.path={tmp_path / 'no'}",
                          "--num-processes", "8")
    assert lines[0] == (f"gqa-uptrain plan for {tmp_path / 'no'} on 8 process(es) (not converted yet: planned from "
                        f"{llama_7b_config} with convert.groups=8 KV heads):")
    assert "optimizer steps      23,841 (gradient accumulation 64)" in lines  # 1,024 / (2 x 8), not / 2
    converted = Shape.of(with_kv_heads(LlamaConfig.from_pretrained(llama_7b_config), 8))
    setup = Setup(2, 4096, "fsdp", 8, checkpointing=True)
    assert f"memory per GPU       fsdp over 8 process(es), micro-batch 2 x 4096, {converted.params:,} of " \
           f"{converted.params:,} parameters trained:" in lines
    total = gib(setup.memory(converted).total(checkpointing=True))
    assert any(line.startswith(f"  total              {total} (with activation checkpointing") for line in lines)
    assert not (tmp_path / "no").exists()
    assert set(readme_dry_run()) <= {line.partition("; estimate")[0] for line in lines}  # the README shows this run


def readme_dry_run() -> list[str]:
    """The lines README.md shows of the paper recipe's dry run (its first line names the Hub source instead)."""
    block = (REPO / "README.md").read_text().split("$ gqa-uptrain recipes/llama-2-7b-gqa8.yaml --dry-run")[1]
    shown = block.split("```")[0].splitlines()[2:]
    return [line.removesuffix("; ...") for line in shown if line.strip() != "..."]


def test_the_accelerate_config_follows_one_rule_and_is_never_skipped(llama_7b_config, tmp_path, capsys, monkeypatch):
    """Relative to the current directory, as gqa-pipeline and scripts/launch.sh hand it to accelerate: from the
    repository the estimate is FSDP's; from elsewhere it is one line, not a silent DDP estimate."""
    argv = (f"convert.source={llama_7b_config}", f"model.path={tmp_path / 'no'}", "--num-processes", "8")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        main([str(PAPER_RECIPE), *argv, "--dry-run"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.splitlines() == [
        f"gqa-uptrain: error: accelerate_config recipes/accelerate/fsdp.yaml is not a file (relative to the current "
        f"directory, {tmp_path}): run from the folder the recipe's paths are relative to, or give its absolute path"]
    absolute = f"accelerate_config={REPO / 'recipes' / 'accelerate' / 'fsdp.yaml'}"
    assert any(line.startswith("memory per GPU       fsdp over 8") for line in dry_run_lines(
        capsys, PAPER_RECIPE, *argv, absolute))
    assert accelerate_config_file(absolute.partition("=")[2]).name == "fsdp.yaml"


def test_the_largest_micro_batch_that_fits_is_suggested(llama_7b_config, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    lines = dry_run_lines(capsys, PAPER_RECIPE, f"convert.source={llama_7b_config}", f"model.path={tmp_path / 'no'}",
                          "--num-processes", "8", "--gpu", "h100")
    shape = Shape.of(with_kv_heads(LlamaConfig.from_pretrained(llama_7b_config), 8))
    setup = Setup(2, 4096, "fsdp", 8, checkpointing=True)
    size = largest_micro_batch(shape, setup, 79.6 * GIB, 1024)
    fits = [Setup(m, 4096, "fsdp", 8, checkpointing=True).memory(shape).total(True) <= 79.6 * GIB for m in (
        size, size * 2)]
    assert 128 % size == 0 and fits == [True, False]  # 1,024 / 8 processes: a whole accumulation
    assert lines[-1].startswith(f"micro-batch          at most {size} on one h100 (") and lines[-1].endswith(
        f"batch.micro_batch={size}, gradient accumulation {1024 // (size * 8)}")
    assert largest_micro_batch(shape, Setup(2, 4096, "single", 1, checkpointing=False), 23.6 * GIB, 1024) is None
