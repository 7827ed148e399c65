"""Fresh K/V projections, as transformers initialises a new Linear (the GQA paper's third arm).

Weights are drawn from N(0, initializer_range) and biases start at zero. Norm weights are not projections
and have no random initialisation, so they are mean-pooled and keep the scale the model learned.
"""

import torch

from gqa_uptrain.convert.methods.base import PoolContext, grouped


def pool(heads: torch.Tensor, groups: int, context: PoolContext) -> torch.Tensor:
    shape = (groups, *heads.shape[1:])
    if context.role == "projection":
        return torch.randn(shape, generator=context.generator) * context.init_std
    if context.role == "bias":
        return torch.zeros(shape)
    return grouped(heads, groups).mean(dim=1)
