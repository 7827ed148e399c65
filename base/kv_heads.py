"""KV heads from a config: how many there are, a config with another count, the model it describes, and the
KV-cache bytes that count costs, in the model's dtype or quantized (`KVQuantization`).

Pure arithmetic on configs (no weights, no data), shared by gqa-convert (layout and --dry-run), gqa-uptrain (FLOPs
of the original model) and gqa-eval (KV-cache size in the report, checked there against a real generate()).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
from transformers import AutoModelForCausalLM, AutoModelForImageTextToText, PretrainedConfig, PreTrainedModel
from transformers.models.auto.modeling_auto import (MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
                                                    MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES)

from gqa_uptrain.errors import ConfigError, UnsupportedModelError

# Layer types (transformers' `config.layer_types`) whose cache grows with the context, and those that cap it.
WINDOWED_LAYER_TYPES = {"sliding_attention", "chunked_attention", "hybrid_sliding"}
FULL_LAYER_TYPES = {"full_attention", "attention", "hybrid", "indexed_attention"}


def text_config(config: PretrainedConfig) -> PretrainedConfig:
    """The decoder's config: multimodal configs nest it (`text_config`)."""
    return config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config


def text_config_key(config: PretrainedConfig) -> str | None:
    """The key under which a multimodal wrapper nests its decoder's config (`text_config`); None for a plain LM."""
    inner = text_config(config)
    return None if inner is config else next(key for key, value in vars(config).items() if value is inner)


def kv_heads_of(config: PretrainedConfig) -> int:
    """The decoder's KV head count; configs that omit it mean one KV head per query head."""
    config = text_config(config)
    heads = config.to_dict().get("num_key_value_heads")
    return heads if heads is not None else config.num_attention_heads


# Decoder configs that derive num_key_value_heads from a key of their own, the one a new count must be written to.
_KV_HEADS_DERIVED_FROM = {"falcon": "num_kv_heads"}


def kv_heads_keys(config: PretrainedConfig) -> tuple[str, ...]:
    """The keys of a decoder config that hold its KV-head count: num_key_value_heads, and the key the config derives
    it from where it derives it (Falcon's num_kv_heads)."""
    derived_from = _KV_HEADS_DERIVED_FROM.get(config.model_type)
    return ("num_key_value_heads",) if derived_from is None else (derived_from, "num_key_value_heads")


def with_kv_heads(config: PretrainedConfig, kv_heads: int) -> PretrainedConfig:
    """A copy of `config` with another KV head count in its decoder; a multimodal wrapper's vision config and the
    rest are kept as they are."""
    key = text_config_key(config)
    if key is not None:
        outer = copy.deepcopy(config)
        setattr(outer, key, with_kv_heads(text_config(config), kv_heads))
        return outer
    values = config.to_dict()
    values.pop("model_type", None)
    values.update(dict.fromkeys(kv_heads_keys(config), kv_heads))
    return type(config)(**values)


def auto_model_class(config: PretrainedConfig) -> type:
    """AutoModelForCausalLM, or AutoModelForImageTextToText for the multimodal wrappers only it builds (Mistral 3,
    LLaVA), whose language model is a causal LM all the same."""
    model_type = config.model_type
    if model_type in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES and model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        return AutoModelForImageTextToText
    return AutoModelForCausalLM


def meta_model(config: PretrainedConfig) -> PreTrainedModel:
    """The model `config` describes, built on the meta device: every parameter's shape, no memory, no weights."""
    with torch.device("meta"):
        return auto_model_class(config).from_config(config)


def head_dim(config: PretrainedConfig) -> int:
    """The decoder's size of one attention head: its `head_dim` where the config says it (Gemma, Qwen3: not always
    hidden_size / heads), else hidden_size / heads. The one derivation: conversion, the KV-cache figures and the
    training budget and estimate all read it here."""
    config = text_config(config)
    return int(getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads)


def kv_heads_and_head_dim(config: PretrainedConfig) -> tuple[int, int]:
    """KV heads and head size, covering configs without `num_key_value_heads` (GPT-2, GPT-NeoX, Falcon, BigCode)."""
    config = text_config(config)
    heads = getattr(config, "num_attention_heads", None)
    if not heads:
        raise UnsupportedModelError(f"{type(config).__name__} has no num_attention_heads: not an attention model")
    kv_heads = getattr(config, "num_key_value_heads", None)
    if not kv_heads:  # Falcon-7B and GPT-BigCode say `multi_query`; Falcon-40B's new architecture says `num_kv_heads`
        multi_query = getattr(config, "multi_query", False) and not getattr(config, "new_decoder_architecture", False)
        kv_heads = 1 if multi_query else getattr(config, "num_kv_heads", None) or heads
    return int(kv_heads), head_dim(config)


def attention_layer_windows(config: PretrainedConfig) -> list[int | None]:
    """One entry per layer that keeps a KV cache: its window (sliding/chunked layers) or None (full attention).

    Mirrors how transformers builds its caches: `layer_types` when the config has it, otherwise `sliding_window` /
    `attention_chunk_size` on every layer. Linear-attention, recurrent, MLP-only and KV-sharing layers keep no
    per-token K/V and are left out.
    """
    config = text_config(config)
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
        if layer_type in WINDOWED_LAYER_TYPES:
            window = config.sliding_window if "sliding" in layer_type else config.attention_chunk_size
            windows.append(int(window))
        elif layer_type in FULL_LAYER_TYPES:
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


@dataclass(frozen=True)
class KVQuantization:
    """How a quantized KV cache stores K and V: transformers' `QuantizedCache` (`nbits`, `q_group_size`,
    `residual_length`, same defaults). Each token's K (and V) vector of each KV head is cut into groups of
    `group_size` consecutive elements (the whole vector when it is shorter); a group is stored as `nbits`-bit
    integers plus a scale and a zero-point in the cache dtype. The `residual_length` most recent tokens stay in full
    precision. `gqa_uptrain.eval.kv_quant` quantizes this way; the bytes below count this way.
    """

    nbits: int
    group_size: int = 64
    residual_length: int = 128

    @property
    def name(self) -> str:
        return f"int{self.nbits}"

    def group(self, head_dim: int) -> int:
        """The group size used on vectors of `head_dim` elements; a group never spans two tokens or two heads."""
        group = min(self.group_size, head_dim)
        if head_dim % group:
            raise ConfigError(f"--kv-group-size {self.group_size} does not divide the head size {head_dim}: "
                              f"use a divisor of {head_dim}")
        return group


def _vector_bytes(head_dim: int, element_bytes: int, quant: KVQuantization | None) -> int:
    """Bytes of one token's K (or V) vector of one KV head: `head_dim` elements of `element_bytes`, or, quantized,
    `nbits` per element (packed) plus a scale and a zero-point of `element_bytes` per group."""
    if quant is None:
        return head_dim * element_bytes
    groups = head_dim // quant.group(head_dim)
    return math.ceil(head_dim * quant.nbits / 8) + groups * 2 * element_bytes


def kv_cache_bytes_per_token(
    config: PretrainedConfig, dtype: torch.dtype | str | None = None, quant: KVQuantization | None = None
) -> int:
    """Bytes one token adds to the KV cache: 2 (K and V) x attention layers x KV heads x bytes per head vector
    (head_dim x element size, or the quantized size of `_vector_bytes`).

    Sliding-window layers count while the context fits in their window (the cost of a token in a short context);
    `kv_cache_bytes` caps them for long contexts. A quantized cache's residual window (at most `residual_length`
    tokens per sequence in full precision) is a constant, not a per-token cost, and is left out.
    """
    kv_heads, head_dim = kv_heads_and_head_dim(config)
    layers = len(attention_layer_windows(config))
    return 2 * layers * kv_heads * _vector_bytes(head_dim, _dtype_bytes(text_config(config), dtype), quant)


def kv_cache_bytes(
    config: PretrainedConfig, context: int, batch: int = 1, dtype: torch.dtype | str | None = None
) -> int:
    """Bytes of K/V a decode step attends over with `context` tokens per sequence (windowed layers capped)."""
    kv_heads, head_dim = kv_heads_and_head_dim(config)
    per_layer_token = 2 * kv_heads * _vector_bytes(head_dim, _dtype_bytes(text_config(config), dtype), None)
    tokens = sum(context if window is None else min(context, window) for window in attention_layer_windows(config))
    return batch * tokens * per_layer_token
