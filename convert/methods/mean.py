"""Mean-pooling: each new KV head is the average of its group's heads (the GQA paper's choice)."""

import torch

from gqa_uptrain.convert.methods.base import PoolContext, grouped


def pool(heads: torch.Tensor, groups: int, context: PoolContext) -> torch.Tensor:
    return grouped(heads, groups).mean(dim=1)
