"""How transformers loads a checkpoint into its model class: each parameter's stored name (transformers' own
renaming rules), and whether the checkpoint holds every parameter the class has."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Collection

from transformers import PreTrainedModel

from gqa_uptrain.errors import CheckpointError


@dataclass(frozen=True)
class CheckpointNames:
    """How transformers loads a checkpoint into its model class: each parameter's stored name, and the parameters
    it builds from several stored tensors (fused MoE experts), which are not pooled."""

    model: PreTrainedModel  # on the meta device
    stored: dict[str, str]  # parameter name -> checkpoint name
    fused: frozenset[str]


def checkpoint_names(model: PreTrainedModel, tensors: Collection[str]) -> CheckpointNames:
    """Rename the checkpoint's tensors as `from_pretrained` does: with the architecture's own renaming rules (a
    multimodal checkpoint's `language_model.model.*` is the module's `model.language_model.*`) and with or without
    the base model's prefix (a bare base model's checkpoint)."""
    from gqa_uptrain.convert.calibration.loading import loaded_names  # transformers' rules, kept per parameter

    loaded = loaded_names(model, tensors)
    return CheckpointNames(model, loaded.stored, frozenset(loaded.fused))


def check_complete(names: CheckpointNames) -> None:
    """Every parameter the model class has must be in the checkpoint: one left out (an index that forgot a shard)
    would be randomly initialised when the output is loaded. Tied parameters (lm_head tied to the embeddings) are
    one tensor, present under any of their names; buffers are not weights and are not asked for."""
    names_of: dict[int, list[str]] = {}
    for name, param in names.model.named_parameters(remove_duplicate=False):
        if name not in names.fused:  # built from other stored tensors (MoE experts): not checked here
            names_of.setdefault(id(param), []).append(name)
    missing = [tied[0] for tied in names_of.values() if not any(name in names.stored for name in tied)]
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise CheckpointError(f"tensor(s) {', '.join(missing[:3])}{more} missing from the checkpoint, though the "
                              "model has them (an index or shard left out?)")


def in_checkpoint(module_name: str, names: CheckpointNames) -> str:
    """The checkpoint's name for a model parameter."""
    name = names.stored.get(module_name)
    if name is not None:
        return name
    raise CheckpointError(f"tensor {module_name} is missing from the checkpoint, though the config says the "
                          "model has it")
