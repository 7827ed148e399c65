"""Where a K/V tensor is pooled: cut it into heads by its layout, let the method pool them, stitch it back.

Pooling accumulates in fp32 and returns the source dtype.
"""

from __future__ import annotations

import zlib

import torch

from gqa_uptrain.convert.layout import Change, FusedQKV, GroupedQKV, HeadsAxis, PerHeadModules
from gqa_uptrain.convert.methods import PoolContext, PoolFn


def seeded_generator(seed: int, name: str) -> torch.Generator:
    """A generator that depends only on the seed and the tensor's name, so any run order gives one result."""
    return torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))


def pool_tensor(change: Change, sources: list[torch.Tensor], kv_heads: int, groups: int, pool: PoolFn,
                context: PoolContext) -> torch.Tensor:
    """The output tensor for one change, made from its source tensors (one, or a group's per-head ones), by a
    method's `pool`."""
    dtype = sources[0].dtype
    if isinstance(change, PerHeadModules):
        heads = torch.stack([t.float() for t in sources])  # this output's group only
        return pool(heads, 1, context)[0].to(dtype)
    tensor = sources[0].float()
    if isinstance(change, HeadsAxis):
        return _pool_rows(tensor, kv_heads, groups, pool, context).to(dtype)
    if isinstance(change, FusedQKV):
        q, kv = tensor[: change.q_rows], tensor[change.q_rows:]
        k, v = kv.chunk(2)
        pooled = [_pool_rows(part, kv_heads, groups, pool, context) for part in (k, v)]
        return torch.cat([q, *pooled]).to(dtype)
    if isinstance(change, GroupedQKV):  # [H, its queries + k + v, head_dim, ...] -> [G, their queries + k + v, ...]
        blocks = tensor.reshape(kv_heads, -1, change.head_dim, *tensor.shape[1:])
        queries = blocks[:, :-2].reshape(groups, -1, *blocks.shape[2:])
        k, v = (pool(blocks[:, i], groups, context)[:, None] for i in (-2, -1))
        return torch.cat([queries, k, v], dim=1).reshape(-1, *tensor.shape[1:]).to(dtype)
    raise TypeError(f"unknown change {change!r}")


def _pool_rows(tensor: torch.Tensor, kv_heads: int, groups: int, pool, context: PoolContext) -> torch.Tensor:
    """Pool a tensor whose first axis is `kv_heads` equal blocks, one per head."""
    heads = tensor.reshape(kv_heads, tensor.shape[0] // kv_heads, *tensor.shape[1:])
    pooled = pool(heads, groups, context)
    return pooled.reshape(groups * heads.shape[1], *tensor.shape[1:])


def pooled_shape(change: Change, kv_heads: int, groups: int) -> tuple[int, ...]:
    """The shape `pool_tensor` returns for `change`."""
    shape = change.shape
    if isinstance(change, HeadsAxis):
        return (shape[0] // kv_heads * groups, *shape[1:])
    if isinstance(change, FusedQKV):
        kv_rows = (shape[0] - change.q_rows) // 2
        return (change.q_rows + 2 * (kv_rows // kv_heads * groups), *shape[1:])
    if isinstance(change, GroupedQKV):
        return (shape[0] - 2 * (kv_heads - groups) * change.head_dim, *shape[1:])
    return shape
