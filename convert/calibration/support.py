"""Which architectures the calibrated method can convert exactly as it reasons, decided from the model class.

The fits assume q/k/v projections of the attention input (biases allowed; or one fused projection, Phi-3's
[q | k | v] qkv_proj or Falcon's query_key_value, KV head by KV head: `fused.py`) and an output projection (o_proj,
Phi's and Falcon's dense, LFM2's out_proj), with rotary embeddings turning the first r dims of each head in pairs,
in halves (i, i + r/2) or interleaved (2i, 2i + 1), the other d - r dims passing unrotated (partial rotary: StableLM,
Phi), as `rotary.py` reads them from the module's own code; and nothing between projection and RoPE but, optionally,
a pair of q/k RMS norms per head or over the whole projection, where RoPE turns every dim in halves (`keys.py`).
q/k LayerNorms (Cohere's, and StableLM's and Phi's qk_layernorm) let nothing move into the queries (keys.py derives
why), so there the keys are pooled as `--method mean` pools them and only the values, o_proj and the refinement are
fitted: exact where heads are copies, and said in one line (`fallback_note`); under clip_qkv (OLMo) the values
too are pooled, and o_proj's refit and the refinement are what calibration adds. Under ALiBi (a Falcon option) the
keys are pooled too: its biases go by the query head's index, so the query heads must keep their order, and the key
fits assume RoPE or no positional embedding. Anything else is refused with the reason, so the user can fall back to
--method mean.
What is around the attention does not matter: a multimodal wrapper's language model is calibrated alone, MoE
layers run with their experts as transformers loads them (`source.py`), and a hybrid's layers without attention
(LFM2's short convolutions, GraniteMoeHybrid's Mamba layers, on transformers' reference code where its kernels do
not run) are run, not fitted (`calibrate.py`). The first layer with attention stands for all of them. A wrapper whose
text config has no causal-LM class (Qwen2-VL's qwen2_vl_text) is run as its text model, the class the wrapper holds
(`wrappers.py`): the fits need only the decoder layers, and on text its M-RoPE is plain RoPE.
"""

from __future__ import annotations

import re
from collections.abc import Collection

import torch
from torch import nn
from transformers import PretrainedConfig

from gqa_uptrain.convert.calibration.fused import FUSED_LAYOUTS, QKV, fused_name
from gqa_uptrain.convert.calibration.keys import fallback, norm_kind
from gqa_uptrain.convert.calibration.layers import (ATTENTION_NAMES, OUTPUT_PROJECTIONS, attention_name, attention_of,
                                                    decoder_layers, first_attention, output_name, skeleton)
from gqa_uptrain.convert.calibration.rotary import rotary_layout
from gqa_uptrain.convert.calibration.source import SourceNames, source_names
from gqa_uptrain.convert.layout import Change, HeadsAxis, KVLayout, PerHeadModules
from gqa_uptrain.errors import UnsupportedModelError

_NORMS = ("q_norm", "k_norm", "q_layernorm", "k_layernorm")

# What a calibrated conversion rewrites in a decoder layer's attention: the q/k/v projections, fused or not (weights
# and biases), the output projection's weight (its bias is added after the heads are summed, so it stays) and q/k
# norm weights (StableLM's per-head q/k LayerNorm modules too).
_REWRITTEN = re.compile(rf"\.({'|'.join(ATTENTION_NAMES)})\.(({'|'.join((*QKV, *FUSED_LAYOUTS))})\.(weight|bias)"
                        rf"|({'|'.join(OUTPUT_PROJECTIONS)})\.weight"
                        r"|[qk]_norm\.weight|[qk]_layernorm\.norms\.\d+\.(weight|bias))$")


def unsupported_reason(config: PretrainedConfig, layout: KVLayout, stored: Collection[str]) -> str | None:
    """Why `--method calibrated` cannot convert this model, or None when it can. `stored`: the checkpoint's
    tensor names (layers are loaded one at a time, each parameter as `source.py` reads it). A multimodal wrapper's
    language model is calibrated alone (`wrappers.py`), so what is asked of it is asked of its text config."""
    try:
        names = source_names(config, stored)
    except UnsupportedModelError as e:
        return str(e)
    config = names.config
    if not all(_is_modelled(c) for c in layout.changes):
        return "its KV heads live outside k_proj/v_proj, a fused qkv_proj or query_key_value and its k norm"
    prefix, layers = decoder_layers(skeleton(config))  # a hybrid's layers without attention are run, not fitted
    if not all(names.has(name) for name, _ in layers.named_parameters(prefix)):
        return "its checkpoint stores the layers under names that transformers' loading rules do not map to its modules"
    i, layer = first_attention(layers)
    return _attention_reason(attention_of(layer), config, layout) or _plan_reason(layer, f"{prefix}.{i}", names)


def rewritten_tensors(config: PretrainedConfig, stored: Collection[str]) -> frozenset[str]:
    """The checkpoint tensors a calibrated conversion writes fitted: its language model's attention projections (and
    q/k norm weights). A wrapper's vision tower has attention tensors of the same names; they are copied."""
    names = source_names(config, stored)
    prefix, _ = decoder_layers(skeleton(names.config))
    return frozenset(checkpoint for name, checkpoint in names.stored.items()
                     if name.startswith(f"{prefix}.") and _REWRITTEN.search(checkpoint))


def _plan_reason(layer: nn.Module, name: str, names: SourceNames) -> str | None:
    """Why the plan would not write the fitted output projection of `layer` (named `name`; so the output would keep
    the source's beside fitted q/k/v, and compute something else without a word), or None."""
    output = names.stored.get(f"{name}.{attention_name(layer)}.{output_name(attention_of(layer))}.weight")
    if output is None or not _REWRITTEN.search(output):
        return f"its output projection {output} is not among the tensors the conversion plan rewrites"
    return None


def _attention_reason(attention: nn.Module, config: PretrainedConfig, layout: KVLayout) -> str | None:
    """Why the fits cannot model this attention module (its projections, q/k norms and rotary layout), or None."""
    kind = norm_kind(attention, layout.query_heads, layout.kv_heads)
    if kind not in (None, "per_head", "whole", "layer"):
        return kind
    others = ({name.split(".")[0] for name, _ in attention.named_parameters()}
              - set(QKV) - set(FUSED_LAYOUTS) - set(OUTPUT_PROJECTIONS) - set(_NORMS))
    if others:
        return (f"its attention has weights beyond q_proj/k_proj/v_proj/o_proj ({', '.join(sorted(others))}), "
                "which the fits do not model")
    apart = all(isinstance(getattr(attention, p, None), nn.Linear) for p in QKV)
    if not (apart or fused_name(attention)) or \
            not any(isinstance(getattr(attention, p, None), nn.Linear) for p in OUTPUT_PROJECTIONS):
        return "its attention has no plain q_proj/k_proj/v_proj or fused projection, and o_proj or dense"
    if kind == "layer":  # pooled keys: the rotary layout is not fitted through
        return None
    rotary = rotary_layout(attention, config)
    if isinstance(rotary, str):
        return rotary
    if kind is not None and (rotary.passed or not torch.equal(rotary.order, torch.arange(rotary.head_dim))):
        return "it has q/k norms and a partial or interleaved rotary embedding, a pairing the norm fits do not model"
    return None


def _is_modelled(change: Change) -> bool:
    """A KV-head tensor the fits rewrite: k/v projections, a k norm (whole-projection, or a weight or module per
    head), a fused projection in the layout its name has in `fused.py`."""
    if isinstance(change, HeadsAxis):
        return change.name.rsplit(".", 2)[-2] in ("k_proj", "v_proj", "k_norm")
    if isinstance(change, PerHeadModules):
        return ".k_layernorm.norms." in change.pattern
    return FUSED_LAYOUTS.get(change.name.rsplit(".", 2)[-2]) is type(change)


def fallback_note(config: PretrainedConfig, stored: Collection[str]) -> str | None:
    """The line a calibrated plan prints where some of the fits fall back to mean pooling (`keys.fallback`), or None."""
    config = source_names(config, stored).config
    _, layers = decoder_layers(skeleton(config))
    pooled = fallback(config, attention_of(first_attention(layers)[1]))
    return pooled.note(config.model_type) if pooled else None


def check_supported(config: PretrainedConfig, layout: KVLayout, stored: Collection[str]) -> None:
    reason = unsupported_reason(config, layout, stored)
    if reason is not None:
        raise UnsupportedModelError(f"--method calibrated cannot convert {config.model_type}: {reason}; "
                                    "use --method mean")
