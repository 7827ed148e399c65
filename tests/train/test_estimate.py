"""The dry run's memory and time estimate: its arithmetic on a tiny config, and its error against measurements."""

import pytest
from transformers import LlamaConfig

from gqa_uptrain.errors import ConfigError
from gqa_uptrain.train.estimate import GIB, Shape, estimate_memory, gpus_to_fit, peak, training_seconds

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
