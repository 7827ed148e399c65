"""What a method is: how it pools a tensor (or that it fits whole layers instead), and what it says and records
about itself, so that no other module compares method names."""

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
    """A registered method, and everything the rest of the tool asks of it."""

    name: str  # --method NAME, and the name the provenance records
    pool: PoolFn | None  # None: fitted layer by layer on calibration text (`convert/calibration/`)
    summary: str  # the model card's sentence: completes "... with the `<name>` method: "
    changed: str  # the dry run's words for the tensors it changed: "12 <changed>"
    expect: str  # what the run says to expect of the converted model, when heads merge
    explained: str  # what --help says it does: "NAME (<explained>)"
    seeded: bool = False  # its result depends on --seed, so the provenance records the seed
    redraws: bool = False  # draws new weights rather than keep the source's: at the source's head count it would
    # silently copy the source instead, so that is refused

    @property
    def calibrates(self) -> bool:
        """Whether it fits on calibration text (and so takes --calibration, --calibration-tokens, --refine-steps)."""
        return self.pool is None

    def record(self, seed: int) -> dict:
        """How a conversion records its method in the provenance: the name, and the seed where it matters."""
        return {"method": self.name, **({"seed": seed} if self.seeded else {})}


def grouped(heads: torch.Tensor, groups: int) -> torch.Tensor:
    """[H, ...] -> [groups, H // groups, ...]: the heads of each output group side by side."""
    return heads.reshape(groups, heads.shape[0] // groups, *heads.shape[1:])
