"""The interface every pooling method implements."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:  # torch, and layout's transformers model classes, load only when a method runs: not for --help
    import torch

    from gqa_uptrain.convert.layout import Role


@dataclass(frozen=True)
class PoolContext:
    """What a method may need beyond the heads: the tensor's role and a generator seeded for this tensor."""

    role: Role
    generator: torch.Generator
    init_std: float


class PoolFn(Protocol):
    def __call__(self, heads: torch.Tensor, groups: int, context: PoolContext) -> torch.Tensor:
        """[H, ...] fp32 heads -> [groups, ...]; consecutive heads form a group."""
        ...


@dataclass(frozen=True)
class Method:
    """A registered method: its pool function (None: fitted layer by layer, see `convert/calibration/`) and the
    sentence the model card says about it."""

    pool: PoolFn | None
    summary: str  # completes "... with the `<name>` method: ", e.g. "each new key/value head is ..."


def grouped(heads: torch.Tensor, groups: int) -> torch.Tensor:
    """[H, ...] -> [groups, H // groups, ...]: the heads of each output group side by side."""
    return heads.reshape(groups, heads.shape[0] // groups, *heads.shape[1:])
