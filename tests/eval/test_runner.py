"""Pieces of the run that need no model."""

from types import SimpleNamespace

import torch
from transformers import LlamaConfig

from gqa_uptrain.eval.runner import config_figures, unique_labels


def test_labels_are_short_and_unique():
    assert unique_labels(["meta-llama/Llama-2-7b-hf", "./Llama-2-7b-gqa8", "out/mqa/"]) == [
        "Llama-2-7b-hf", "Llama-2-7b-gqa8", "mqa"]
    assert unique_labels(["runs/gqa2/model", "runs/mqa/model", "runs/mqa-uptrained/model"]) == [
        "gqa2", "mqa", "mqa-uptrained"]  # gqa-uptrain's exported `model` folder is named by its run folder
    assert unique_labels(["/work/runs/smollm-mqa/model", "a/smollm-mqa/model", "./model"]) == [
        "runs/smollm-mqa", "a/smollm-mqa", "model"]
    assert unique_labels(["./tiny", "tiny"]) == ["tiny#1", "tiny#2"]


def test_config_figures_are_read_from_the_config_which_is_left_unchanged():
    config = LlamaConfig(hidden_size=64, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2)
    spec = SimpleNamespace(config=config)
    before = config.to_dict()
    assert config_figures(spec, torch.bfloat16) == {
        "num_attention_heads": 4, "num_key_value_heads": 2,
        "kv_cache_bytes_per_token": 3 * 2 * 2 * 16 * 2,  # layers x (K and V) x KV heads x head_dim x bf16 bytes
    }
    assert config.to_dict() == before and vars(spec) == {"config": config}
