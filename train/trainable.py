"""Which parameters learn (`train.trainable`): all of them, or only the attention projections a conversion changed.

gqa-convert changes q/k/v/o and nothing else: the embeddings, norms and MLPs are the original model's, already
trained on its whole pretraining budget. `trainable: attention` gives gradients and AdamW state to the attention
projections alone (their weights and biases, fused or not), so a 7B needs its optimizer state for 1.3B parameters
instead of 6.7B; the rest is frozen and held once, in the checkpoint's own dtype where the launch allows it, which
leaves it bit-identical in the exported model.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from gqa_uptrain.errors import ConfigError

# The attribute names under which transformers' decoder layers hold their attention module.
ATTENTION_ATTRIBUTES = ("self_attn", "self_attention", "attention", "attn")


def _decoder(model: nn.Module) -> tuple[str, nn.Module]:
    """(qualified name, module) of the language model's decoder: a multimodal wrapper's vision tower has attention
    of its own, which gqa-convert leaves alone."""
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else model
    return next(((name, module) for name, module in model.named_modules() if module is decoder), ("", model))


def attention_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """(qualified name, module) of each decoder layer's attention, outermost only."""
    root, decoder = _decoder(model)
    found: list[str] = []
    for local, module in decoder.named_modules():  # parents come before their children
        name = ".".join(part for part in (root, local) if part)
        if any(name.startswith(outer + ".") for outer in found):
            continue
        if name.rsplit(".", 1)[-1] in ATTENTION_ATTRIBUTES and any(isinstance(m, nn.Linear) for m in module.modules()):
            found.append(name)
            yield name, module


def attention_parameter_names(model: nn.Module) -> set[str]:
    """Names of the attention projections' parameters: every nn.Linear weight and bias inside an attention module
    (q/k/v/o, or a fused qkv_proj); per-head norms inside it are not projections and stay frozen."""
    names = set()
    for prefix, attention in attention_modules(model):
        for name, module in attention.named_modules():
            if isinstance(module, nn.Linear):
                for kind, _ in module.named_parameters(recurse=False):
                    names.add(".".join(part for part in (prefix, name, kind) if part))
    return names


@dataclass(frozen=True)
class TrainableSet:
    """How many parameters learn and how many are frozen (for the plan and the checkpoint size)."""

    trainable: int
    frozen: int

    def describe(self) -> str:
        total = self.trainable + self.frozen
        return (f"trainable            {self.trainable:,} of {total:,} parameters "
                f"({self.trainable / max(total, 1):.1%}); {self.frozen:,} frozen")


def select_trainable(model: nn.Module, trainable: str, frozen_dtype: torch.dtype | None) -> TrainableSet:
    """Freeze everything but the attention projections when `trainable` is 'attention' (nothing for 'all').

    Trainable parameters are fp32 master weights (autocast makes the bf16 copies); frozen ones are cast to
    `frozen_dtype` (the checkpoint's dtype) where it is given, so they take half the memory and leave the run
    unchanged. None keeps them fp32: FSDP2 and ZeRO-3 flatten a unit's parameters into one buffer of one dtype.
    """
    if trainable == "all":
        count = sum(p.numel() for p in model.parameters())
        return TrainableSet(trainable=count, frozen=0)
    learn = attention_parameter_names(model)
    if not learn:
        raise ConfigError(f"{type(model).__name__} has no attention projections under "
                         f"{', '.join(ATTENTION_ATTRIBUTES)}: use train.trainable=all")
    counts = {True: 0, False: 0}
    for name, parameter in model.named_parameters():  # tied parameters are listed once
        learns = name in learn
        parameter.requires_grad_(learns)
        if learns:
            parameter.data = parameter.data.float()
        elif frozen_dtype is not None:
            parameter.data = parameter.data.to(frozen_dtype)
        counts[learns] += parameter.numel()
    return TrainableSet(trainable=counts[True], frozen=counts[False])
