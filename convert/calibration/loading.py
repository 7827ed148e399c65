"""How transformers turns a checkpoint's tensors into a model's parameters, kept per parameter so that one decoder
layer can be read alone: most parameters are one stored tensor under another name (`WeightRenaming`), some are
built from several (`WeightConverter`: a MoE layer's experts, stored one by one, stacked into 3-D parameters).

The rules are transformers' own (`get_model_conversion_mapping`), applied as `from_pretrained` applies them, so a
parameter built here is the one `from_pretrained` would load; nothing about an architecture is written again here.
"""

from __future__ import annotations

from collections.abc import Collection
from copy import deepcopy
from dataclasses import dataclass, field
from typing import Callable

import torch
from transformers import PreTrainedModel
from transformers.conversion_mapping import get_model_conversion_mapping
from transformers.core_model_loading import WeightConverter, WeightRenaming, dot_natural_key, rename_source_key


@dataclass(frozen=True)
class Fused:
    """A parameter transformers builds from several stored tensors, and the rule that builds it."""

    converter: WeightConverter
    sources: list[tuple[str, str]] = field(default_factory=list)  # (stored name, the rule's pattern it matched)

    def build(self, name: str, read: Callable[[str], torch.Tensor], model: PreTrainedModel) -> torch.Tensor:
        """The parameter `name` (as `model` names it), from the stored tensors `read` returns."""
        converter = deepcopy(self.converter)  # it collects tensors: one copy per parameter, as transformers does
        for stored, pattern in self.sources:
            converter.add_tensor(name, stored, pattern, lambda stored=stored: read(stored))
        built = converter.convert(name, model=model, config=model.config)[name]
        return built[0] if isinstance(built, list) else built


@dataclass(frozen=True)
class LoadedNames:
    """Each parameter of a model (by its module name): the one tensor the checkpoint stores it as, or how it is
    built from several."""

    stored: dict[str, str]
    fused: dict[str, Fused]


def loaded_names(model: PreTrainedModel, tensors: Collection[str]) -> LoadedNames:
    """Rename the checkpoint's tensors as `from_pretrained` does (in its order, which decides the order of the
    experts a converter stacks): with the architecture's rules, and with or without the base model's prefix."""
    rules = get_model_conversion_mapping(model)
    renamings = [rule for rule in rules if isinstance(rule, WeightRenaming)]
    converters = [rule for rule in rules if isinstance(rule, WeightConverter)]
    by_pattern = {pattern: converter for converter in converters for pattern in converter.source_patterns}
    params = model.state_dict()
    stored: dict[str, str] = {}
    fused: dict[str, Fused] = {}
    for name in sorted(tensors, key=dot_natural_key):
        renamed, pattern = rename_source_key(name, renamings, converters, model.base_model_prefix, params)
        if renamed not in params and name in params:  # as transformers does: a name the rules should not touch
            renamed, pattern = rename_source_key(name, [], [], model.base_model_prefix, params)
        if pattern is None:
            stored[renamed] = name
        else:
            fused.setdefault(renamed, Fused(by_pattern[pattern])).sources.append((name, pattern))
    return LoadedNames(stored, fused)
