"""Fused q/k/v projections, split into q, k and v rows for the fits and fused back in the attention's own layout.

Two layouts are in use, told apart by the projection's name (`layout.py` names them as the plan sees them):
- Phi-3's `qkv_proj`: rows [q | k | v] (`FusedQKV`);
- Falcon's `query_key_value` (new decoder architecture): one block of rows per KV head, [its query heads, its key,
  its value] (`GroupedQKV`).
In both, query head j reads KV head j // (H / K). The fits give the new query heads group by group, each group's
H / G heads together (`order` says which original head each is), so fitted [q | k | v] rows regroup block by block
with no further permutation, and the output projection's columns follow the same query order in both layouts.
"""

from __future__ import annotations

import torch
from torch import nn

from gqa_uptrain.convert.layout import FusedQKV, GroupedQKV

QKV = ("q_proj", "k_proj", "v_proj")
FUSED_LAYOUTS: dict[str, type[FusedQKV | GroupedQKV]] = {"qkv_proj": FusedQKV, "query_key_value": GroupedQKV}

Projections = dict[str, tuple[torch.Tensor, torch.Tensor | None]]


def fused_name(attention: nn.Module) -> str | None:
    """The name of the attention's fused q/k/v projection, or None where q, k and v are apart."""
    return next((name for name in FUSED_LAYOUTS if isinstance(getattr(attention, name, None), nn.Linear)), None)


def split_qkv(attention: nn.Module, query_heads: int) -> Projections:
    """Weight and bias of q_proj, k_proj and v_proj: the attention's own, or split out of its fused projection."""
    name = fused_name(attention)
    if name is None:
        return {n: (getattr(attention, n).weight, getattr(attention, n).bias) for n in QKV}
    fused, query_rows = getattr(attention, name), query_heads * attention.head_dim
    weights = split_rows(fused.weight, name, query_rows, attention.head_dim)
    biases = split_rows(fused.bias, name, query_rows, attention.head_dim) if fused.bias is not None else (None,) * 3
    return dict(zip(QKV, zip(weights, biases)))


def fuse_qkv(name: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Rows of q, k and v (any trailing shape) fused in the layout of the projection `name`."""
    if FUSED_LAYOUTS[name] is FusedQKV:
        return torch.cat([q, k, v])
    kv_heads = k.shape[0] // head_dim
    blocks = [t.reshape(kv_heads, -1, head_dim, *t.shape[1:]) for t in (q, k, v)]
    return torch.cat(blocks, dim=1).flatten(0, 2)


def split_rows(rows: torch.Tensor, name: str, query_rows: int, head_dim: int) -> tuple[torch.Tensor, ...]:
    """A fused projection's rows (or bias) as q, k and v rows (k and v are the same size)."""
    kv_rows = (rows.shape[0] - query_rows) // 2
    if FUSED_LAYOUTS[name] is FusedQKV:
        return rows.split([query_rows, kv_rows, kv_rows])
    blocks = rows.reshape(kv_rows // head_dim, -1, head_dim, *rows.shape[1:])
    return blocks[:, :-2].flatten(0, 2), blocks[:, -2].flatten(0, 1), blocks[:, -1].flatten(0, 1)
