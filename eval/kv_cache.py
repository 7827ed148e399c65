"""The KV cache a real `generate()` run leaves behind, measured (`measured_kv_cache_bytes_per_token`).

The config's figure is computed in `gqa_uptrain.kv_heads` (`kv_cache_bytes_per_token`); the two must agree, and the
tests hold them to it.
"""

from __future__ import annotations

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from gqa_uptrain.errors import ConfigError, UnsupportedModelError

MEASURE_PROMPT = "The quick brown fox jumps over the lazy dog, and the dog does not seem to mind at all."


def _prompt_ids(model: PreTrainedModel, tokenizer_or_input_ids, prompt: str) -> torch.Tensor:
    if isinstance(tokenizer_or_input_ids, torch.Tensor):
        input_ids = tokenizer_or_input_ids if tokenizer_or_input_ids.dim() == 2 else tokenizer_or_input_ids[None]
    elif isinstance(tokenizer_or_input_ids, PreTrainedTokenizerBase):
        input_ids = tokenizer_or_input_ids(prompt, return_tensors="pt").input_ids
    else:
        raise ConfigError(f"expected a tokenizer or a tensor of input ids, got {type(tokenizer_or_input_ids).__name__}")
    if input_ids.numel() == 0:
        raise ConfigError("the prompt for measuring the KV cache is empty")
    return input_ids.to(model.device)


@torch.inference_mode()
def measured_kv_cache_bytes_per_token(
    model: PreTrainedModel,
    tokenizer_or_input_ids: PreTrainedTokenizerBase | torch.Tensor,
    prompt: str = MEASURE_PROMPT,
    new_tokens: int = 4,
) -> float:
    """Bytes per token of the K/V tensors held in the cache after a real greedy `generate()` run.

    Counts every layer's `keys` and `values` and divides by batch x cached tokens. Keep the prompt shorter than any
    sliding window, or windowed layers make the figure smaller than `kv_cache_bytes_per_token`.
    """
    input_ids = _prompt_ids(model, tokenizer_or_input_ids, prompt)
    output = model.generate(
        input_ids,
        attention_mask=torch.ones_like(input_ids),
        max_new_tokens=new_tokens,
        do_sample=False,
        eos_token_id=None,  # every sequence runs the full length
        pad_token_id=model.generation_config.pad_token_id or 0,
        return_dict_in_generate=True,
    )
    cache = output["cache"] if "cache" in output else output["past_key_values"]  # renamed in transformers 5.x
    tensors = [t for layer in cache.layers for t in (layer.keys, layer.values) if isinstance(t, torch.Tensor)]
    if not tensors:
        raise UnsupportedModelError(f"{type(model).__name__} left no key/value tensors in its generate() cache")
    cached_tokens = int(cache.get_seq_length())
    return sum(t.numel() * t.element_size() for t in tensors) / (input_ids.shape[0] * cached_tokens)
