"""Attention that reads each KV head once, as a serving engine's does, under names transformers' `AttentionInterface`
knows: `packed_gqa_sdpa`, and `packed_gqa_split_kv`, which hands one-token steps on a GPU to the split-KV Triton
kernel of `decode_kernels`. `packed_gqa_attention` registers both and switches a model over for a block;
`switched_attention` switches to any registered implementation (kv_quant.py's too).

Importing this module registers nothing: transformers' attention registry changes only when a model is switched.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from transformers import AttentionInterface, PreTrainedModel
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from gqa_uptrain.errors import UnsupportedModelError, one_line

try:  # Triton comes with CUDA builds of torch; without it there is no split-KV kernel
    from gqa_uptrain.eval import decode_kernels
except ImportError:
    decode_kernels = None

PACKED_GQA_ATTENTION = "packed_gqa_sdpa"
SPLIT_KV_ATTENTION = "packed_gqa_split_kv"


def packed_gqa_sdpa(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """Scaled dot-product attention that reads each KV head once: K/V are never repeated up to the query heads.

    Decoding one token, the G query heads that share a KV head become G query rows of that head,
    (B, H, 1, D) -> (B, H_kv, G, D): a plain attention over the KV heads that every SDPA kernel runs, with a mask
    too (`enable_gqa` with a mask falls back to the math kernel on CUDA). Longer queries (prefill) use `enable_gqa`.
    Query head h uses KV head h // G, as in transformers' `repeat_kv`.
    """
    if kwargs.get("softcap") is not None:
        raise UnsupportedModelError("packed GQA attention does not support attention-logit soft-capping")
    batch, heads, q_len, _ = query.shape
    kv_heads = key.shape[1]
    groups = heads // kv_heads
    if q_len == 1:
        if attention_mask is not None and attention_mask.shape[1] > 1:  # a per-head mask follows its query head
            attention_mask = attention_mask.reshape(batch, kv_heads, groups, -1)
        packed = query.reshape(batch, kv_heads, groups, query.shape[-1])
        out = F.scaled_dot_product_attention(
            packed, key, value, attn_mask=attention_mask, dropout_p=dropout, scale=scaling
        )
        return out.reshape(batch, heads, 1, value.shape[-1]).transpose(1, 2), None
    causal = attention_mask is None
    if causal and key.shape[2] > q_len:  # prefill into an empty static cache: the slots past the prompt are unwritten
        key, value = key[:, :, :q_len], value[:, :, :q_len]
    out = F.scaled_dot_product_attention(
        query, key, value, attn_mask=attention_mask, dropout_p=dropout, scale=scaling, is_causal=causal,
        enable_gqa=groups > 1,
    )
    return out.transpose(1, 2).contiguous(), None


def packed_gqa_split_kv(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """`packed_gqa_sdpa`, with one-token steps on a GPU in the split-KV Triton kernel (`decode_kernels`).

    SDPA kernels give one program per (sequence, KV head); with few KV heads that leaves most of a GPU idle.
    """
    batch, heads, q_len, dim = query.shape
    if q_len == 1 and decode_kernels is not None and dropout == 0.0:
        packed = query.reshape(batch, key.shape[1], heads // key.shape[1], dim)
        if decode_kernels.supports(packed, key, value, attention_mask):
            scale = scaling if scaling is not None else dim**-0.5
            out = decode_kernels.split_kv_decode(packed, key, value, attention_mask, scale)
            return out.reshape(batch, heads, 1, dim).transpose(1, 2), None
    return packed_gqa_sdpa(module, query, key, value, attention_mask, dropout, scaling, **kwargs)


ATTENTION_FUNCTIONS = {PACKED_GQA_ATTENTION: packed_gqa_sdpa, SPLIT_KV_ATTENTION: packed_gqa_split_kv}


def split_kv_available() -> bool:
    """Whether the split-KV Triton kernel can run here (Triton is installed); it runs on CUDA tensors only."""
    return decode_kernels is not None


def register_attention() -> None:
    """Make the packed-GQA attention functions known to transformers by name, with stock SDPA's boolean masks.

    Done when a model is switched over (`packed_gqa_attention`), never at import; registering again is harmless.
    """
    for name, function in ATTENTION_FUNCTIONS.items():
        AttentionInterface.register(name, function)
        AttentionMaskInterface.register(name, sdpa_mask)


def attention_implementation(model: PreTrainedModel) -> str | None:
    """The name of the attention implementation `model` runs now.

    transformers 5 has a public setter (`set_attn_implementation`) but no public getter: the private config
    attribute is read here and nowhere else, so a rename in transformers has one place to follow.
    """
    return model.config._attn_implementation


@contextmanager
def switched_attention(model: PreTrainedModel, wanted: str, purpose: str) -> Iterator[None]:
    """Run `model` with the registered attention `wanted` inside the block, its own after it (also after an error);
    a model that cannot switch is refused in one line that starts with `purpose`."""
    previous = attention_implementation(model)
    try:
        model.set_attn_implementation(wanted)
    except (ValueError, KeyError) as error:  # e.g. Gemma-2: soft-capped attention logits, which SDPA cannot compute
        raise UnsupportedModelError(f"{purpose}: {one_line(error)}") from error
    if attention_implementation(model) != wanted:
        raise UnsupportedModelError(f"{type(model).__name__} cannot switch its attention implementation")
    try:
        yield
    finally:
        model.set_attn_implementation(previous)


@contextmanager
def packed_gqa_attention(model: PreTrainedModel, split_kv: bool = False) -> Iterator[None]:
    """Run `model` with `packed_gqa_sdpa` (or `packed_gqa_split_kv`) inside the block, its own attention after it."""
    register_attention()
    wanted = SPLIT_KV_ATTENTION if split_kv else PACKED_GQA_ATTENTION
    with switched_attention(model, wanted, "engine-style decode needs SDPA attention"):
        yield
