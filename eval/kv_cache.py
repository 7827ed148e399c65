"""KV-cache size per token: what grouped-query attention shrinks.

Computed from the config (`kv_cache_bytes_per_token`, `kv_cache_bytes`) and measured from the cache a real
`generate()` run leaves behind (`measured_kv_cache_bytes_per_token`). The two must agree; the tests hold them to it.
"""

from __future__ import annotations

import torch
from transformers import PretrainedConfig, PreTrainedModel, PreTrainedTokenizerBase

from gqa_uptrain.errors import ConfigError, UnsupportedModelError

# Layer types (transformers' `config.layer_types`) whose cache grows with the context, and those that cap it.
_WINDOWED_LAYER_TYPES = {"sliding_attention", "chunked_attention", "hybrid_sliding"}
_FULL_LAYER_TYPES = {"full_attention", "attention", "hybrid", "indexed_attention"}

MEASURE_PROMPT = "The quick brown fox jumps over the lazy dog, and the dog does not seem to mind at all."


def _text_config(config: PretrainedConfig) -> PretrainedConfig:
    """The decoder's config: multimodal configs nest it (`text_config`)."""
    return config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config


def kv_heads_and_head_dim(config: PretrainedConfig) -> tuple[int, int]:
    """KV heads and head size, covering configs without `num_key_value_heads` (GPT-2, GPT-NeoX, Falcon, BigCode)."""
    config = _text_config(config)
    heads = getattr(config, "num_attention_heads", None)
    if not heads:
        raise UnsupportedModelError(f"{type(config).__name__} has no num_attention_heads: not an attention model")
    kv_heads = getattr(config, "num_key_value_heads", None)
    if not kv_heads:  # Falcon-7B and GPT-BigCode say `multi_query`; Falcon-40B's new architecture says `num_kv_heads`
        multi_query = getattr(config, "multi_query", False) and not getattr(config, "new_decoder_architecture", False)
        kv_heads = 1 if multi_query else getattr(config, "num_kv_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return int(kv_heads), int(head_dim)


def attention_layer_windows(config: PretrainedConfig) -> list[int | None]:
    """One entry per layer that keeps a KV cache: its window (sliding/chunked layers) or None (full attention).

    Mirrors how transformers builds its caches: `layer_types` when the config has it, otherwise `sliding_window` /
    `attention_chunk_size` on every layer. Linear-attention, recurrent, MLP-only and KV-sharing layers keep no
    per-token K/V and are left out.
    """
    config = _text_config(config)
    layers = config.num_hidden_layers
    layer_types = getattr(config, "layer_types", None)
    if layer_types is None:
        if getattr(config, "sliding_window", None) is not None:
            layer_types = ["sliding_attention"] * layers
        elif getattr(config, "attention_chunk_size", None) is not None:
            layer_types = ["chunked_attention"] * layers
        else:
            layer_types = ["full_attention"] * layers
    sharing = getattr(config, "kv_sharing_modes", None) or [None] * len(layer_types)
    windows: list[int | None] = []
    for layer_type, mode in zip(layer_types, sharing):
        if mode == "reuse":
            continue
        if layer_type in _WINDOWED_LAYER_TYPES:
            window = config.sliding_window if "sliding" in layer_type else config.attention_chunk_size
            windows.append(int(window))
        elif layer_type in _FULL_LAYER_TYPES:
            windows.append(None)
    return windows


def _dtype_bytes(config: PretrainedConfig, dtype: torch.dtype | str | None) -> int:
    """Bytes per cached element: the given dtype, else (or for "auto") the checkpoint's own, else float32."""
    if dtype is None or dtype == "auto":
        dtype = getattr(config, "dtype", None) or torch.float32
    if isinstance(dtype, str):
        resolved = getattr(torch, dtype.removeprefix("torch."), None)
        if not isinstance(resolved, torch.dtype):
            raise ConfigError(f"unknown dtype {dtype!r}")
        dtype = resolved
    return dtype.itemsize


def kv_cache_bytes_per_token(config: PretrainedConfig, dtype: torch.dtype | str | None = None) -> int:
    """Bytes one token adds to the KV cache: 2 (K and V) x attention layers x KV heads x head_dim x element size.

    Sliding-window layers count while the context fits in their window (the cost of a token in a short context);
    `kv_cache_bytes` caps them for long contexts.
    """
    kv_heads, head_dim = kv_heads_and_head_dim(config)
    layers = len(attention_layer_windows(config))
    return 2 * layers * kv_heads * head_dim * _dtype_bytes(_text_config(config), dtype)


def kv_cache_bytes(
    config: PretrainedConfig, context: int, batch: int = 1, dtype: torch.dtype | str | None = None
) -> int:
    """Bytes of K/V a decode step attends over with `context` tokens per sequence (windowed layers capped)."""
    kv_heads, head_dim = kv_heads_and_head_dim(config)
    per_layer_token = 2 * kv_heads * head_dim * _dtype_bytes(_text_config(config), dtype)
    tokens = sum(context if window is None else min(context, window) for window in attention_layer_windows(config))
    return batch * tokens * per_layer_token


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
    cache = output.past_key_values
    tensors = [t for layer in cache.layers for t in (layer.keys, layer.values) if isinstance(t, torch.Tensor)]
    if not tensors:
        raise UnsupportedModelError(f"{type(model).__name__} left no key/value tensors in its generate() cache")
    cached_tokens = int(cache.get_seq_length())
    return sum(t.numel() * t.element_size() for t in tensors) / (input_ids.shape[0] * cached_tokens)
