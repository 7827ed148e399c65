"""Which architectures the calibrated method can convert exactly as it reasons, decided from the model class.

The fits assume plain q/k/v/o projections of the attention input (biases allowed) and rotary embeddings over
the whole head in transformers' rotate_half layout, with nothing between projection and RoPE but, optionally, a
pair of q/k RMS norms per head or over the whole projection (`keys.py`). Anything else (LayerNorms or per-head
norm weights after the projection, a fused qkv projection, partial or interleaved rotary, clipped q/k/v) is
refused with the reason, so the user can fall back to --method mean.
"""

from __future__ import annotations

import sys
from collections.abc import Collection

import torch
from torch import nn
from transformers import PretrainedConfig

from gqa_uptrain.convert.calibration.keys import norm_kind
from gqa_uptrain.convert.calibration.layers import decoder_layers, skeleton
from gqa_uptrain.convert.checkpoint_reader import stored_name
from gqa_uptrain.convert.layout import Change, FusedQKV, HeadsAxis, KVLayout
from gqa_uptrain.errors import UnsupportedModelError
from gqa_uptrain.kv_heads import text_config_key

_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")
_FUSED = ("qkv_proj", "o_proj")  # Phi-3: rows [q | k | v] (layout.FusedQKV)
_NORMS = ("q_norm", "k_norm")


def unsupported_reason(config: PretrainedConfig, layout: KVLayout, stored: Collection[str]) -> str | None:
    """Why `--method calibrated` cannot convert this model, or None when it can. `stored`: the checkpoint's
    tensor names (layers are loaded one at a time by their module names)."""
    if text_config_key(config) is not None:
        return "a multimodal wrapper (its language model under text_config), which the calibration does not run"
    if not all(_is_modelled(c) for c in layout.changes):
        return "its KV heads live outside k_proj/v_proj, a [q | k | v] qkv_proj and k_norm (per-head norm modules)"
    if (getattr(config, "partial_rotary_factor", None) or 1.0) != 1.0:
        return "its rotary embedding covers only part of each head"
    if getattr(config, "clip_qkv", None) is not None:
        return "it clips q/k/v after the projection"
    prefix, layers = decoder_layers(skeleton(config))
    names = [f"{prefix}.0.{name}" for name, _ in layers[0].named_parameters()]
    if not all(stored_name(name, stored) is not None for name in names):
        return "its checkpoint stores the layers under other names than its modules (e.g. fused MoE experts)"
    attention = layers[0].self_attn
    kind = norm_kind(attention, layout.query_heads, layout.kv_heads)
    if kind not in (None, "per_head", "whole"):
        return kind
    others = ({name.split(".")[0] for name, _ in attention.named_parameters()}
              - set(_PROJECTIONS) - set(_FUSED) - set(_NORMS))
    if others:
        return (f"its attention has weights beyond q_proj/k_proj/v_proj/o_proj ({', '.join(sorted(others))}), "
                "which the fits do not model")
    projections = _FUSED if hasattr(attention, "qkv_proj") else _PROJECTIONS
    if not all(isinstance(getattr(attention, p, None), nn.Linear) for p in projections):
        return "its attention has no plain q_proj/k_proj/v_proj/o_proj or qkv_proj/o_proj"
    if not _rotates_halves(attention):
        return "its rotary embedding does not pair dimension i with i + head_dim/2"
    return None


def _is_modelled(change: Change) -> bool:
    """A KV-head tensor the fits rewrite: k/v projections, a whole-projection k_norm, a fused [q | k | v]."""
    if isinstance(change, HeadsAxis):
        return change.name.rsplit(".", 2)[-2] in ("k_proj", "v_proj", "k_norm")
    return isinstance(change, FusedQKV) and change.name.rsplit(".", 2)[-2] == "qkv_proj"


def check_supported(config: PretrainedConfig, layout: KVLayout, stored: Collection[str]) -> None:
    reason = unsupported_reason(config, layout, stored)
    if reason is not None:
        raise UnsupportedModelError(f"--method calibrated cannot convert {config.model_type}: {reason}; "
                                    "use --method mean")


def _rotates_halves(attention: nn.Module) -> bool:
    """Whether the module's own rotate_half maps e_0 to e_{d/2} (the pairing the key fit assumes)."""
    rotate = getattr(sys.modules[type(attention).__module__], "rotate_half", None)
    if rotate is None:
        return False
    d = attention.head_dim
    unit = torch.zeros(d)
    unit[0] = 1
    expected = torch.zeros(d)
    expected[d // 2] = 1
    return torch.equal(rotate(unit), expected)
