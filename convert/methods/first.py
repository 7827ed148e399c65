"""Keep the first head of each group and drop the others (the GQA paper's second arm)."""

import torch

from gqa_uptrain.convert.methods.base import PoolContext, grouped


def pool(heads: torch.Tensor, groups: int, context: PoolContext) -> torch.Tensor:
    return grouped(heads, groups)[:, 0].clone()
