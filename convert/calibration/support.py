"""Which architectures the calibrated method can convert exactly as it reasons, decided from the model class.

The fits assume q/k/v projections of the attention input (biases allowed; or one fused [q | k | v] qkv_proj, as
Phi-3 has) and an output projection (o_proj, or Phi's dense), with rotary embeddings turning the first r dims of
each head in pairs, in halves (i, i + r/2) or interleaved (2i, 2i + 1), the other d - r dims passing unrotated
(partial rotary: StableLM, Phi), as `rotary.py` reads them from the module's own code; and nothing between
projection and RoPE but, optionally, a pair of q/k RMS norms per head or over the whole projection, where RoPE
turns every dim in halves (`keys.py`). Anything else is refused with the reason, so the user can fall back to
--method mean. Notably q/k LayerNorms (StableLM's and Phi's qk_layernorm): LN(z) = w * (z - mean(z)) / std(z) (+ b)
after the projection. The mean subtraction does not commute with a rotation within a rotary pair, so no complex
scale passes; what could pass, a real scale per pair, meets per-dim weights that differ between StableLM's heads
(w_f / w_g would have to be equal on both dims of every pair) and, in Phi, a bias that even a sign does not pass.
Copies would still convert exactly, but distinct heads could not be merged by moving anything into the queries.
What is around the attention does not matter: a multimodal wrapper's language model is calibrated alone, and MoE
layers run with their experts as transformers loads them (`source.py`).
"""

from __future__ import annotations

from collections.abc import Collection

import torch
from torch import nn
from transformers import PretrainedConfig

from gqa_uptrain.convert.calibration.keys import norm_kind
from gqa_uptrain.convert.calibration.layers import OUTPUT_PROJECTIONS, decoder_layers, output_name, skeleton
from gqa_uptrain.convert.calibration.rotary import rotary_layout
from gqa_uptrain.convert.calibration.source import SourceNames, source_names
from gqa_uptrain.convert.layout import Change, FusedQKV, HeadsAxis, KVLayout
from gqa_uptrain.errors import UnsupportedModelError

_PROJECTIONS = ("q_proj", "k_proj", "v_proj")
_FUSED = ("qkv_proj",)  # Phi-3: rows [q | k | v] (layout.FusedQKV)
_NORMS = ("q_norm", "k_norm")
_HYBRID = ("some of its decoder layers have no attention (short convolutions, Mamba layers), which the layer-by-layer "
           "calibration does not run")


def unsupported_reason(config: PretrainedConfig, layout: KVLayout, stored: Collection[str]) -> str | None:
    """Why `--method calibrated` cannot convert this model, or None when it can. `stored`: the checkpoint's
    tensor names (layers are loaded one at a time, each parameter as `source.py` reads it). A multimodal wrapper's
    language model is calibrated alone (`wrappers.py`), so what is asked of it is asked of its text config."""
    try:
        names = source_names(config, stored)
    except UnsupportedModelError as e:
        return str(e)
    config = names.config
    if getattr(config, "qk_layernorm", False):
        return ("its q/k LayerNorms (qk_layernorm) subtract each head's mean after the projection, which no "
                "rotation within a rotary pair commutes with, and scale by weights of each head's own (StableLM) or "
                "add a bias (Phi), so a key head's per-pair scale cannot move into its queries")
    if not all(_is_modelled(c) for c in layout.changes):
        return "its KV heads live outside k_proj/v_proj, a [q | k | v] qkv_proj and k_norm (per-head norm modules)"
    if getattr(config, "clip_qkv", None) is not None:
        return "it clips q/k/v after the projection"
    try:
        prefix, layers = decoder_layers(skeleton(config))
    except UnsupportedModelError:  # its first layer has no attention (LFM2's short convolution)
        return _HYBRID
    if any(getattr(layer, "self_attn", None) is None for layer in layers):  # GraniteMoeHybrid's Mamba layers
        return _HYBRID
    if not all(names.has(f"{prefix}.0.{name}") for name, _ in layers[0].named_parameters()):
        return "its checkpoint stores the layers under names that transformers' loading rules do not map to its modules"
    attention = layers[0].self_attn
    return _attention_reason(attention, config, layout) or _plan_reason(attention, f"{prefix}.0", names)


def rewritten_tensors(config: PretrainedConfig, stored: Collection[str]) -> frozenset[str]:
    """The checkpoint tensors a calibrated conversion writes fitted: its language model's attention projections (and
    q/k norm weights). A wrapper's vision tower has attention tensors of the same names; they are copied."""
    from gqa_uptrain.convert.plan import _is_attention_projection  # plan.py imports this module

    names = source_names(config, stored)
    prefix, _ = decoder_layers(skeleton(names.config))
    return frozenset(checkpoint for name, checkpoint in names.stored.items()
                     if name.startswith(f"{prefix}.") and _is_attention_projection(checkpoint))


def _plan_reason(attention: nn.Module, layer: str, names: SourceNames) -> str | None:
    """Why the plan would not write the fitted output projection (so the output would keep the source's beside
    fitted q/k/v, and compute something else without a word), or None."""
    from gqa_uptrain.convert.plan import _is_attention_projection  # plan.py imports this module

    output = names.stored.get(f"{layer}.self_attn.{output_name(attention)}.weight")
    if output is None or not _is_attention_projection(output):
        return f"its output projection {output} is not among the tensors the conversion plan rewrites"
    return None


def _attention_reason(attention: nn.Module, config: PretrainedConfig, layout: KVLayout) -> str | None:
    """Why the fits cannot model this attention module (its projections, q/k norms and rotary layout), or None."""
    kind = norm_kind(attention, layout.query_heads, layout.kv_heads)
    if kind not in (None, "per_head", "whole"):
        return kind
    others = ({name.split(".")[0] for name, _ in attention.named_parameters()}
              - set(_PROJECTIONS) - set(_FUSED) - set(OUTPUT_PROJECTIONS) - set(_NORMS))
    if others:
        return (f"its attention has weights beyond q_proj/k_proj/v_proj/o_proj ({', '.join(sorted(others))}), "
                "which the fits do not model")
    projections = _FUSED if hasattr(attention, "qkv_proj") else _PROJECTIONS
    if not all(isinstance(getattr(attention, p, None), nn.Linear) for p in projections) or \
            not any(isinstance(getattr(attention, p, None), nn.Linear) for p in OUTPUT_PROJECTIONS):
        return "its attention has no plain q_proj/k_proj/v_proj or qkv_proj, and o_proj or dense"
    rotary = rotary_layout(attention, config)
    if isinstance(rotary, str):
        return rotary
    if kind is not None and (rotary.passed or not torch.equal(rotary.order, torch.arange(rotary.head_dim))):
        return "it has q/k norms and a partial or interleaved rotary embedding, a pairing the norm fits do not model"
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
