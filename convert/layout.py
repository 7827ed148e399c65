"""Which tensors change when a model gets fewer KV heads, found from the model class itself.

Both configurations are instantiated on the meta device (`gqa_uptrain.kv_heads.meta_model`: no memory, no
weights) and their parameters are compared. Every difference must be explained by one of a few layouts, or the
architecture is refused:
- `HeadsAxis`: one axis holds the KV heads back to back (k/v projections and their biases, a k-norm over
  the whole projection as in OLMo-2, a per-head norm weight of shape [heads, head_dim] as in Cohere);
- `FusedQKV`: rows [q | k | v] of one fused projection (Phi-3's `qkv_proj`);
- `GroupedQKV`: one fused projection whose rows go KV head by KV head, [its queries, k, v] (Falcon's new decoder
  architecture, `query_key_value`), which shapes alone would take for `FusedQKV`: named by model type;
- `PerHeadModules`: one module per KV head in a ModuleList (StableLM's per-head k-norms).
"""

from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass
from typing import Literal

from torch import nn
from transformers import AutoModelForCausalLM, PretrainedConfig
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

from gqa_uptrain.errors import InvalidGroupsError, UnsupportedModelError
from gqa_uptrain.kv_heads import auto_model_class, kv_heads_of, meta_model, text_config, with_kv_heads

Role = Literal["projection", "bias", "norm"]


@dataclass(frozen=True)
class HeadsAxis:
    """`name` holds the KV heads as equal blocks along its first axis; the output keeps `groups` of them."""

    name: str
    shape: tuple[int, ...]
    role: Role


@dataclass(frozen=True)
class FusedQKV:
    """`name` stacks query, key and value rows; only the key and value parts are pooled."""

    name: str
    shape: tuple[int, ...]
    q_rows: int
    role: Role


@dataclass(frozen=True)
class GroupedQKV:
    """`name` holds one block of rows per KV head: its query heads, its key, its value (`head_dim` rows each). An
    output group's block gathers the queries of its heads and pools their keys and values."""

    name: str
    shape: tuple[int, ...]
    head_dim: int
    role: Role


# Model types whose fused projection interleaves the heads as GroupedQKV does, not [q | k | v].
GROUPED_QKV_TYPES = frozenset({"falcon"})


@dataclass(frozen=True)
class PerHeadModules:
    """Parameters `pattern.format(i)` for each KV head i; the output keeps indices below `groups`."""

    pattern: str
    shape: tuple[int, ...]
    role: Role


Change = HeadsAxis | FusedQKV | GroupedQKV | PerHeadModules


@dataclass(frozen=True)
class KVLayout:
    """The KV-head facts of one model and the tensors a conversion to `groups` must rewrite."""

    model_type: str
    query_heads: int
    kv_heads: int
    groups: int
    changes: tuple[Change, ...]


def find_layout(config: PretrainedConfig, groups: int) -> KVLayout:
    """Check that `config`'s architecture can hold `groups` KV heads and list the tensors that change."""
    model_type = config.model_type
    if auto_model_class(config) is AutoModelForCausalLM and model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise UnsupportedModelError(f"model type '{model_type}' is not a decoder-only causal language model "
                                    "in transformers")
    if "num_key_value_heads" not in text_config(config).to_dict():
        raise UnsupportedModelError(f"model type '{model_type}' cannot express grouped-query attention in "
                                    "transformers (its config has no num_key_value_heads)")
    _check_falcon_architecture(text_config(config))
    _check_one_head_layout(text_config(config), model_type)
    query_heads = text_config(config).num_attention_heads
    kv_heads = kv_heads_of(config)
    _check_groups(groups, kv_heads, model_type)
    if groups == kv_heads:
        return KVLayout(model_type, query_heads, kv_heads, groups, ())
    old = _meta_parameters(config)
    new = _meta_parameters(with_kv_heads(config, groups))
    changes = _explain(old, new, kv_heads, groups, query_heads, grouped_qkv=model_type in GROUPED_QKV_TYPES)
    if not changes:
        raise UnsupportedModelError(f"model type '{model_type}' cannot express grouped-query attention in "
                                    "transformers (num_key_value_heads changes none of its weights)")
    return KVLayout(model_type, query_heads, kv_heads, groups, tuple(changes))


def _check_falcon_architecture(config: PretrainedConfig) -> None:
    """Falcon holds a KV-head count only in its new decoder architecture (Falcon-40B, Falcon-180B); the old one
    (Falcon-7B, Falcon-RW) has one KV head (multi_query) or one per query head, whatever num_kv_heads says."""
    if config.model_type == "falcon" and not config.new_decoder_architecture:
        heads = "one KV head (multi_query)" if config.multi_query else "one KV head per query head"
        raise UnsupportedModelError("model type 'falcon' cannot express grouped-query attention in transformers "
                                    f"without its new decoder architecture (new_decoder_architecture: true, as "
                                    f"Falcon-40B has); this config has the old one, with {heads}")


# Attention sizes that transformers' heterogeneous configs (`per_layer_config`) may set layer by layer.
_HEAD_SIZES = ("num_key_value_heads", "num_attention_heads", "head_dim")


def _check_one_head_layout(config: PretrainedConfig, model_type: str) -> None:
    """Refuse, naming the first layer that differs, a config whose attention layers differ in head counts or sizes
    (`per_layer_config`, as Gemma 4 has): one --groups would pool them unlike, and num_key_value_heads names only
    some of them. Per-layer overrides of other sizes, and layers without attention, are fine."""
    varying = sorted(set(getattr(config, "per_layer_attributes", None) or ()) & set(_HEAD_SIZES))
    layers = config.per_layer_config if varying else []
    for key in varying:
        values = [getattr(layer, key) for layer in layers]
        differs = next((i for i, value in enumerate(values) if value != values[0]), None)
        if differs is not None:
            raise UnsupportedModelError(f"model type '{model_type}': layer {differs} has {key} {values[differs]} "
                                        f"where layer 0 has {values[0]} (per-layer attention sizes); gqa-convert "
                                        "converts models whose attention layers all share one head layout")


def check_written_config(written: PretrainedConfig, expected: PretrainedConfig, model_type: str) -> None:
    """Refuse, naming the first layer that differs, an output config.json that does not describe the converted
    weights (`expected`, from `with_kv_heads`): a config can set some layers' KV heads under another key than
    num_key_value_heads (Gemma 4's num_global_key_value_heads, an explicit per_layer_config), equal to it in the
    source, so the model has one head layout, but left at the old count when only num_key_value_heads is rewritten."""
    written, expected = text_config(written), text_config(expected)
    varying = sorted(set(getattr(written, "per_layer_attributes", None) or ()) & set(_HEAD_SIZES))
    for i in range(expected.num_hidden_layers if varying else 0):  # transformers without per-layer configs: none
        for key in varying:
            got, want = (getattr(config.per_layer_config[i], key, None) for config in (written, expected))
            if got != want:
                raise UnsupportedModelError(f"model type '{model_type}': config.json sets layer {i}'s {key} apart "
                                            f"from num_key_value_heads, so the output would give it {got} where its "
                                            f"converted weights have {want}; gqa-convert rewrites only "
                                            "num_key_value_heads")


def _check_groups(groups: int, kv_heads: int, model_type: str) -> None:
    if groups < 1:
        raise InvalidGroupsError(f"--groups must be at least 1, got {groups}")
    if groups > kv_heads:
        raise InvalidGroupsError(f"--groups {groups} is above the model's {kv_heads} KV heads "
                                 f"({model_type}); a conversion can only reduce them")
    if kv_heads % groups:
        divisors = [d for d in range(1, kv_heads + 1) if kv_heads % d == 0]
        raise InvalidGroupsError(f"--groups {groups} does not divide the model's {kv_heads} KV heads; "
                                 f"choose one of {divisors}")


@dataclass(frozen=True)
class _Param:
    shape: tuple[int, ...]
    role: Role | None  # None: not a parameter the converter knows how to pool


def _meta_parameters(config: PretrainedConfig) -> dict[str, _Param]:
    """Every parameter's shape and role, from a model built on the meta device."""
    params = {}
    for module_name, module in meta_model(config).named_modules():
        for param_name, param in module.named_parameters(recurse=False):
            name = f"{module_name}.{param_name}" if module_name else param_name
            params[name] = _Param(tuple(param.shape), _role(module, param_name))
    return params


def _role(module: nn.Module, param_name: str) -> Role | None:
    if isinstance(module, nn.Linear):
        return "projection" if param_name == "weight" else "bias"
    if "norm" in type(module).__name__.lower() and param_name in ("weight", "bias"):
        return "norm"
    return None


def _explain(old: dict[str, _Param], new: dict[str, _Param], kv_heads: int, groups: int, query_heads: int,
             grouped_qkv: bool) -> list[Change]:
    changes: list[Change] = []
    vanished = sorted(set(old) - set(new))
    if set(new) - set(old):
        raise UnsupportedModelError(f"fewer KV heads add parameters {sorted(set(new) - set(old))[:3]}; "
                                    "this layout is not understood")
    for name in old:
        if name in new and old[name].shape != new[name].shape:
            changes.append(_explain_reshaped(name, old[name], new[name].shape, kv_heads, groups, query_heads,
                                             grouped_qkv))
    changes.extend(_explain_vanished(vanished, old, kv_heads, groups))
    return changes


def _explain_reshaped(name: str, old: _Param, new_shape: tuple[int, ...], kv_heads: int, groups: int,
                      query_heads: int, grouped_qkv: bool) -> Change:
    axes = [i for i, (a, b) in enumerate(zip(old.shape, new_shape)) if a != b]
    if old.role is not None and len(axes) == 1 and axes[0] == 0:
        before, after = old.shape[0], new_shape[0]
        if before % kv_heads == 0 and before // kv_heads * groups == after:
            return HeadsAxis(name, old.shape, old.role)
        head_dim = (before - after) // (2 * (kv_heads - groups))
        if old.role != "norm" and before == (query_heads + 2 * kv_heads) * head_dim:
            if grouped_qkv:
                return GroupedQKV(name, old.shape, head_dim, old.role)
            return FusedQKV(name, old.shape, query_heads * head_dim, old.role)
    raise UnsupportedModelError(f"tensor {name} changes from {list(old.shape)} to {list(new_shape)} with fewer "
                                "KV heads, in a layout gqa-convert does not understand")


def _explain_vanished(names: list[str], old: dict[str, _Param], kv_heads: int, groups: int) -> list[Change]:
    """Parameters that exist once per KV head (`...norms.{i}.weight`) and disappear for i >= groups."""
    indices: dict[str, set[int]] = defaultdict(set)
    for name in names:
        match = re.fullmatch(r"(.*\.)(\d+)(\..*)", name)
        if match is None or old[name].role is None:
            raise UnsupportedModelError(f"tensor {name} disappears with fewer KV heads, in a layout gqa-convert "
                                        "does not understand")
        pattern = match[1].replace("{", "{{") + "{}" + match[3]
        indices[pattern].add(int(match[2]))
    changes = []
    for pattern, vanished in sorted(indices.items()):
        kept = {i for i in range(kv_heads) if pattern.format(i) in old} - vanished
        if kept != set(range(groups)) or vanished != set(range(groups, kv_heads)):
            raise UnsupportedModelError(f"tensors {pattern.format('N')} do not follow the KV heads")
        first = old[pattern.format(0)]
        changes.append(PerHeadModules(pattern, first.shape, first.role))
    return changes
