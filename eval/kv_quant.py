"""A quantized KV cache, simulated where quality is measured: keys and values are quantized then dequantized ("fake
quant") the way transformers' quantized caches store them, and the model's own attention runs on the result.

What is mirrored: `transformers.cache_utils.QuantizedCache` with its group-wise integer backends and their defaults
(`nbits=4`, `axis_key=axis_value=0`, `q_group_size=64`, `residual_length=128`). The quanto backend (the default)
cuts the cache tensor (batch, KV heads, tokens, head_dim) into groups of `q_group_size` consecutive elements, so
with head_dim a multiple of the group size each token's vector of each KV head is split into head_dim / group
groups (per-token, per-group); HQQ with `axis=1` groups the same way. Each group is quantized asymmetrically, round
to nearest, with no search for better ranges (quanto's `MaxOptimizer`; HQQ without `optimize`):
scale = (max - min) / (2^nbits - 1) and zero-point = -min, both stored in the cache dtype;
q = clamp(round((x + zero) / scale), 0, 2^nbits - 1); x' = q * scale - zero. Neither quanto nor HQQ is needed.

Where this differs from decoding with a real quantized cache, and why:
- The arithmetic runs in float32 on scales rounded to the cache dtype; quanto rounds in the cache dtype and HQQ in
  float32, so a value near a rounding boundary may land one level apart. quanto stores int2/int4 only; int8 is
  what HQQ (nbits=8) stores.
- A head_dim shorter than the group size gives one group per vector; quanto would group consecutive tokens.
- Residual window: the cache keeps its most recent tokens (up to `residual_length`) in full precision and
  quantizes the rest. Scoring runs one forward pass over a sequence, where every query sees the same K/V, so the
  last `residual_length` positions of the sequence stay full precision and all earlier ones are quantized. For the
  queries near the end this is what a decode step sees; earlier queries see their own recent context quantized
  (pessimistic), and a sequence no longer than the window is not quantized at all (optimistic: a real cache
  quantizes a prompt whole when it is prefilled). `--kv-residual 0` quantizes every position.
- The query's own key and value are quantized too (a decode step attends over them unquantized).
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from transformers import AttentionInterface, PreTrainedModel
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from gqa_uptrain.errors import UnsupportedModelError
from gqa_uptrain.kv_heads import KVQuantization, kv_heads_and_head_dim

from .packed_attention import attention_implementation, switched_attention

KV_CACHE_BITS = {"int8": 8, "int4": 4}  # --kv-cache names; "none" is the unquantized cache


def kv_quantization(name: str, group_size: int, residual_length: int) -> KVQuantization | None:
    """The quantization a --kv-cache name stands for (None for "none")."""
    return None if name == "none" else KVQuantization(KV_CACHE_BITS[name], group_size, residual_length)


def fake_quantize(states: torch.Tensor, nbits: int, group_size: int) -> torch.Tensor:
    """`states` (..., head_dim) quantized to `nbits` in groups of `group_size` along the last axis, then dequantized,
    in the dtype of `states` (whose dtype the scale and zero-point are stored in)."""
    *lead, dim = states.shape
    groups = states.float().reshape(*lead, dim // group_size, group_size)
    low, high = groups.amin(-1, keepdim=True), groups.amax(-1, keepdim=True)
    levels = 2**nbits - 1
    scale = ((high - low) / levels).to(states.dtype).float()
    zero = (-low).to(states.dtype).float()
    steps = torch.round((groups + zero) / torch.where(scale > 0, scale, 1.0)).clamp(0, levels)
    return (steps * scale - zero).reshape(states.shape).to(states.dtype)


class QuantizedShare:
    """How many of the positions attention read came from the quantized part of the cache: a row that quantized
    nothing (every sequence within the residual window) must not pass for a measurement of the quantized cache."""

    def __init__(self) -> None:
        self.quantized = self.total = 0

    def add(self, tokens: int, residual_length: int) -> None:
        self.quantized += max(0, tokens - residual_length)
        self.total += tokens

    @property
    def value(self) -> float | None:
        """The share of positions quantized; None when nothing was read."""
        return self.quantized / self.total if self.total else None


def quantize_kv(states: torch.Tensor, quant: KVQuantization) -> torch.Tensor:
    """Key or value states (batch, KV heads, tokens, head_dim) as the cache holds them: quantized, except the last
    `residual_length` tokens, which are returned unchanged."""
    quantized = states.shape[-2] - quant.residual_length
    if quantized <= 0:
        return states
    group = quant.group(states.shape[-1])
    old = fake_quantize(states[..., :quantized, :], quant.nbits, group)
    return torch.cat([old, states[..., quantized:, :]], dim=-2)


def _inner_attention(module: torch.nn.Module, name: str) -> Callable:
    """The attention function `name` stands for: a registered one, or the model's own eager attention, which
    transformers keeps in the modeling file rather than the registry."""
    eager = getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)
    function = ALL_ATTENTION_FUNCTIONS.get(name, eager if name == "eager" else None)
    if function is None:
        raise UnsupportedModelError(f"{type(module).__name__}: no attention function {name!r} to run on a quantized "
                                    "KV cache")
    return function


def quantized_kv_function(quant: KVQuantization, inner: str, share: QuantizedShare) -> Callable:
    """An attention function that quantizes K and V as the cache would, then runs the `inner` implementation;
    `share` counts the positions it quantized."""

    def attention(module, query, key, value, attention_mask, *args, **kwargs):
        share.add(key.shape[-2], quant.residual_length)
        return _inner_attention(module, inner)(
            module, query, quantize_kv(key, quant), quantize_kv(value, quant), attention_mask, *args, **kwargs
        )

    return attention


def _register(quant: KVQuantization, inner: str, share: QuantizedShare) -> str:
    """Register the quantizing attention under a name that says what it does, with `inner`'s mask; returns it."""
    name = f"gqa_kv_{quant.name}_g{quant.group_size}_r{quant.residual_length}_{inner}"
    AttentionInterface.register(name, quantized_kv_function(quant, inner, share))
    if inner in ALL_MASK_ATTENTION_FUNCTIONS:
        AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[inner])
    return name


@contextmanager
def quantized_kv_attention(model: PreTrainedModel, quant: KVQuantization | None) -> Iterator[QuantizedShare | None]:
    """Run `model` with its K/V quantized as `quant` says inside the block (nothing changes for None); yields the
    count of what was quantized."""
    if quant is None:
        yield None
        return
    quant.group(kv_heads_and_head_dim(model.config)[1])  # a group size that does not fit fails here, in one line
    share = QuantizedShare()
    wanted = _register(quant, attention_implementation(model), share)
    with switched_attention(model, wanted, "a quantized KV cache needs a switchable attention"):
        yield share
