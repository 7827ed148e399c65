"""The projections a block takes of one input (q/k/v, gate/up) as one matrix product each, so that a decode step
launches three fewer skinny matrix products per layer; checked against the unfused model's logits."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel

from gqa_uptrain.errors import UnsupportedModelError

# Sibling projections that a block applies to one input, in the order its forward calls them.
FUSABLE_PROJECTIONS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))
FUSED_TOLERANCE = 0.05  # relative logit difference above which the fused model is not the same model


class _Outputs:
    """The split result of the last fused product, handed from the first projection called to its siblings."""

    parts: tuple[torch.Tensor, ...] = ()


class _FusedPart(nn.Module):
    """Stands in for one projection of a fused group: the first computes the group's product, the others read it.

    A decode step is a chain of skinny matrix products (a few rows against a whole weight), each paying a launch
    and a ramp-up and tail on the GPU; one product over the concatenated weights pays them once. The split relies on
    the block calling its projections in `FUSABLE_PROJECTIONS` order, which `fused_projections` checks.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, sizes: list[int], index: int,
                 outputs: _Outputs) -> None:
        super().__init__()
        self.fused_weight, self.fused_bias, self.sizes, self.index, self.outputs = weight, bias, sizes, index, outputs

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.index == 0:
            self.outputs.parts = F.linear(hidden, self.fused_weight, self.fused_bias).split(self.sizes, dim=-1)
        return self.outputs.parts[self.index]


def _fusable_groups(model: nn.Module) -> Iterator[tuple[nn.Module, tuple[str, ...]]]:
    """(block, names) for every block whose sibling projections are plain linears of one input size and dtype."""
    for block in model.modules():
        for names in FUSABLE_PROJECTIONS:
            linears = [getattr(block, name, None) for name in names]
            if not all(type(linear) is nn.Linear for linear in linears):
                continue
            if len({(lin.in_features, lin.weight.dtype, lin.bias is None) for lin in linears}) == 1:
                yield block, names


def _fuse(block: nn.Module, names: tuple[str, ...]) -> list[nn.Linear]:
    """Swap `names` of `block` for the parts of one fused product; returns the linears taken out."""
    linears = [getattr(block, name) for name in names]
    weight = torch.cat([lin.weight.detach() for lin in linears])
    bias = None if linears[0].bias is None else torch.cat([lin.bias.detach() for lin in linears])
    sizes, outputs = [lin.out_features for lin in linears], _Outputs()
    for index, name in enumerate(names):
        setattr(block, name, _FusedPart(weight, bias, sizes, index, outputs))
    return linears


@contextmanager
def fused_projections(model: PreTrainedModel, probe: torch.Tensor | None = None) -> Iterator[int]:
    """Run `model` with each block's q/k/v and gate/up projections as one matrix product each, inside the block.

    Yields the number of groups fused. The fused weights are copies, freed on exit, so the model's own parameters
    stay untouched for anything else that holds them; they cost the size of those projections again while the
    block runs (7.4 GB for a 7B Llama in bf16). With
    `probe` (token ids), the logits are compared with the unfused model's first: a block that calls its projections
    in another order would give other logits, and is refused in one line rather than decoded wrongly.
    """
    expected = None if probe is None else _probe_logits(model, probe)
    taken = [(block, names, _fuse(block, names)) for block, names in list(_fusable_groups(model))]
    try:
        difference = None if expected is None else _relative_difference(model, probe, expected)
        if difference is not None and difference > FUSED_TOLERANCE:
            raise UnsupportedModelError(
                f"{type(model).__name__} does not call its projections in the order {FUSABLE_PROJECTIONS} "
                f"(fused logits differ by {difference:.2g} relative): cannot fuse them"
            )
        yield len(taken)
    finally:
        for block, names, linears in taken:
            for name, linear in zip(names, linears):
                _release_part(getattr(block, name))
                setattr(block, name, linear)


def _release_part(part: _FusedPart) -> None:
    """Drop what a part holds (the fused weights, the last product, which may live in a CUDA graph's memory pool),
    so that nothing a compiled step's caches still reference keeps them alive after the block."""
    part.outputs.parts, part.fused_weight, part.fused_bias = (), None, None


@torch.no_grad()
def _probe_logits(model: PreTrainedModel, probe: torch.Tensor) -> torch.Tensor:
    return model(probe, use_cache=False).logits.float()


def _relative_difference(model: PreTrainedModel, probe: torch.Tensor, expected: torch.Tensor) -> float:
    """How far the fused model's logits on `probe` are from `expected`, relative to their size (a norm ratio: bf16
    rounds one product over the concatenated weights differently from several, elementwise, by more than any fixed
    tolerance over a 32-layer model). A sibling called before the first of its group finds no product: infinite."""
    try:
        return float((_probe_logits(model, probe) - expected).norm() / expected.norm().clamp_min(1e-12))
    except IndexError:
        return float("inf")
