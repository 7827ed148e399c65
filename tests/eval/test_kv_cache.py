"""KV-cache bytes per token: the config's figure equals what a real generate() leaves in its cache; it scales as G/H."""

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    FalconConfig,
    Gemma2Config,
    Gemma2ForCausalLM,
    GPT2Config,
    GPT2LMHeadModel,
    GPTBigCodeConfig,
    MistralConfig,
    Qwen3Config,
    Qwen3NextConfig,
)

from gqa_uptrain.errors import ConfigError
from gqa_uptrain.eval.kv_cache import measured_kv_cache_bytes_per_token
from gqa_uptrain.kv_heads import attention_layer_windows, kv_cache_bytes, kv_cache_bytes_per_token
from tiny_models import random_model


@pytest.fixture(scope="module")
def tiny_models(tiny_llama, tiny_llama_gqa2):
    paths = {4: tiny_llama, 2: tiny_llama_gqa2}
    return {kv: AutoModelForCausalLM.from_pretrained(path).eval() for kv, path in paths.items()}


@pytest.mark.parametrize("kv_heads", [4, 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_computed_equals_measured_from_generate(tiny_models, gpt2_tokenizer, kv_heads, dtype):
    model = tiny_models[kv_heads].to(dtype)
    computed = kv_cache_bytes_per_token(model.config, dtype=dtype)
    assert computed == 2 * 2 * kv_heads * 16 * dtype.itemsize  # K and V, 2 layers, head_dim 64 / 4 heads
    assert measured_kv_cache_bytes_per_token(model, gpt2_tokenizer) == computed
    model.to(torch.float32)


def test_bytes_scale_as_kv_heads_over_query_heads(tiny_models, gpt2_tokenizer):
    mha, gqa = tiny_models[4], tiny_models[2]
    assert kv_cache_bytes_per_token(gqa.config) / kv_cache_bytes_per_token(mha.config) == 2 / 4
    ids = gpt2_tokenizer(["a batch of two prompts", "of the same length!"], return_tensors="pt").input_ids
    assert measured_kv_cache_bytes_per_token(gqa, ids) / measured_kv_cache_bytes_per_token(mha, ids) == 2 / 4


def test_the_checkpoint_dtype_is_the_default(tiny_llama):
    model = AutoModelForCausalLM.from_pretrained(tiny_llama)
    assert kv_cache_bytes_per_token(model.config) == 2 * 2 * 4 * 16 * 4
    assert kv_cache_bytes_per_token(model.config, dtype="auto") == 2 * 2 * 4 * 16 * 4
    assert kv_cache_bytes_per_token(model.config, dtype="bfloat16") == 2 * 2 * 4 * 16 * 2
    with pytest.raises(ConfigError, match="unknown dtype"):
        kv_cache_bytes_per_token(model.config, dtype="bfloat17")


@pytest.mark.parametrize("model_type", ["qwen3", "phi3", "gemma3_text", "starcoder2"])
def test_measured_matches_computed_on_other_architectures(model_type):
    model = random_model(model_type, kv_heads=2)  # head_dim 16 given explicitly, fp32
    ids = torch.randint(3, 90, (2, 6), generator=torch.Generator().manual_seed(0))  # inside gemma3's window of 8
    assert measured_kv_cache_bytes_per_token(model, ids, new_tokens=2) == kv_cache_bytes_per_token(model.config)


def test_config_without_kv_heads_counts_every_head_gpt2():
    config = GPT2Config(n_layer=3, n_head=4, n_embd=64, vocab_size=50)
    assert kv_cache_bytes_per_token(config, dtype=torch.float32) == 2 * 3 * 4 * 16 * 4
    model = GPT2LMHeadModel(config).eval()
    ids = torch.randint(0, 50, (1, 5), generator=torch.Generator().manual_seed(0))
    assert measured_kv_cache_bytes_per_token(model, ids) == kv_cache_bytes_per_token(config, torch.float32)


def test_multi_query_configs_have_one_kv_head():
    assert kv_cache_bytes_per_token(FalconConfig(num_hidden_layers=2), "float16") == 2 * 2 * 1 * 64 * 2
    falcon_40b = FalconConfig(num_hidden_layers=2, new_decoder_architecture=True, num_kv_heads=8)
    assert kv_cache_bytes_per_token(falcon_40b, "float16") == 2 * 2 * 8 * 64 * 2
    assert kv_cache_bytes_per_token(GPTBigCodeConfig(n_layer=2), "float16") == 2 * 2 * 1 * 64 * 2


def test_head_dim_from_the_config_wins_over_hidden_over_heads():
    config = Qwen3Config(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=32, num_hidden_layers=2)
    assert kv_cache_bytes_per_token(config, "bfloat16") == 2 * 2 * 2 * 32 * 2
    no_head_dim = MistralConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=None,
                                num_hidden_layers=2, sliding_window=None)
    assert kv_cache_bytes_per_token(no_head_dim, "bfloat16") == 2 * 2 * 2 * 16 * 2


def test_head_dim_is_the_decoders_in_a_multimodal_config():
    from transformers import Gemma3Config

    from gqa_uptrain.kv_heads import head_dim, kv_heads_and_head_dim

    config = Gemma3Config(text_config={"hidden_size": 64, "num_attention_heads": 4, "head_dim": 32,
                                       "num_key_value_heads": 2, "num_hidden_layers": 2, "intermediate_size": 96})
    assert getattr(config, "head_dim", None) is None  # the wrapper does not say it: its text_config does
    assert head_dim(config) == 32 and kv_heads_and_head_dim(config) == (2, 32)


def test_linear_attention_layers_keep_no_kv_cache():
    config = Qwen3NextConfig(num_hidden_layers=8, num_key_value_heads=2, head_dim=64)  # 3 linear : 1 full
    assert attention_layer_windows(config) == [None, None]
    assert kv_cache_bytes_per_token(config, "bfloat16") == 2 * 2 * 2 * 64 * 2


def test_sliding_window_layers_stop_growing_at_their_window():
    config = Gemma2Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                          num_attention_heads=4, num_key_value_heads=2, head_dim=16, sliding_window=8)
    per_layer_token = 2 * 2 * 16 * 4
    assert attention_layer_windows(config) == [8, None, 8, None]
    assert kv_cache_bytes_per_token(config, "float32") == 4 * per_layer_token
    assert kv_cache_bytes(config, 6, dtype="float32") == 4 * 6 * per_layer_token
    assert kv_cache_bytes(config, 100, batch=3, dtype="float32") == 3 * (2 * 8 + 2 * 100) * per_layer_token
    model = Gemma2ForCausalLM(config).eval()
    short = torch.randint(0, 64, (1, 5), generator=torch.Generator().manual_seed(0))
    assert measured_kv_cache_bytes_per_token(model, short, new_tokens=2) == kv_cache_bytes_per_token(config, "float32")


def test_mistral_sliding_window_without_layer_types_applies_to_every_layer():
    config = MistralConfig(num_hidden_layers=3, sliding_window=4096)
    assert attention_layer_windows(config) == [4096] * 3


def test_bad_prompt_input_is_refused(tiny_models):
    with pytest.raises(ConfigError, match="tokenizer or a tensor"):
        measured_kv_cache_bytes_per_token(tiny_models[4], "not a tokenizer")
    with pytest.raises(ConfigError, match="empty"):
        measured_kv_cache_bytes_per_token(tiny_models[4], torch.zeros(1, 0, dtype=torch.long))
