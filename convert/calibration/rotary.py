"""Which head dims RoPE turns together, read from the attention module's own code, and the one order the fits use.

transformers turns the first r dims of every query and key head as x * cos + rotate(x) * sin, with r = head_dim or,
for partial rotary (StableLM, Phi: `rotary_ndims`, partial_rotary_factor * head_dim), fewer; the other d - r dims
pass unrotated. Two pairings are in use:
- halves (Llama and most): rotate(x) = [-x2, x1], so dims i and i + r/2 turn together, by frequency i;
- interleaved (Helium): rotate(x) = stack(-x[1::2], x[0::2]), so dims 2i and 2i + 1 turn together, by frequency i
  (its apply_rotary_pos_emb repeats each frequency of the table twice).
Moving the same permutation onto the rows of every query head and every key head leaves each q . k, and so the
attention, as it was. So the fits work in one canonical order: [first dims of the r/2 pairs | their second dims |
the d - r unrotated dims], pair p turning by frequency p, where rotate_half's algebra holds on the first r dims.
`canonical` moves a projection's rows there and `restore` moves fitted rows back.

The pairing is probed, not looked up by model name: the module's own apply_rotary_pos_emb turns each unit vector
e_i at distinct angles theta_p, given a table laid out [theta | theta] as transformers' rotary modules build it, and
e_i comes back as cos(theta_p) e_i + sin(theta_p) e_j: dims i and j form pair p, i first (the + sign), as in
rotate_half where e_p turns towards e_{p + r/2}. A module that turns dims any other way is refused (support.py).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn
from transformers import PretrainedConfig

_Apply = Callable[..., tuple[torch.Tensor, torch.Tensor]]


@dataclass(frozen=True)
class RotaryLayout:
    """Head size d, the r dims RoPE turns, `order` (canonical dim c is the module's dim order[c]), and the module's
    own rotation; `sliced`: the module cuts q/k to their first r dims before calling it (StableLM, Phi)."""

    head_dim: int
    rotary: int
    order: torch.Tensor
    apply: _Apply
    sliced: bool

    @property
    def passed(self) -> int:
        """Dims per head that pass unrotated."""
        return self.head_dim - self.rotary

    def canonical(self, rows: torch.Tensor) -> torch.Tensor:
        """[heads * d, ...] rows with each head's dims in canonical order."""
        heads = rows.reshape(-1, self.head_dim, *rows.shape[1:])
        return heads[:, self.order.to(rows.device)].reshape(rows.shape)

    def restore(self, rows: torch.Tensor) -> torch.Tensor:
        """Inverse of `canonical`."""
        heads = rows.reshape(-1, self.head_dim, *rows.shape[1:])
        return heads[:, torch.argsort(self.order).to(rows.device)].reshape(rows.shape)

    def turn(self, q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
             ) -> tuple[torch.Tensor, torch.Tensor]:
        """q, k [B, h, T, d] as the module turns them, with its own function: its first r dims, or all of them."""
        if not self.sliced:
            return self.apply(q, k, cos, sin)
        r = self.rotary
        q_turned, k_turned = self.apply(q[..., :r], k[..., :r], cos, sin)
        return torch.cat([q_turned, q[..., r:]], -1), torch.cat([k_turned, k[..., r:]], -1)


def rotary_layout(attention: nn.Module, config: PretrainedConfig) -> RotaryLayout | str:
    """The attention module's rotary layout, or why the fits cannot model it. r: the module's `rotary_ndims` where
    it cuts q/k itself, else head_dim times the config's partial_rotary_factor (Phi-3's function cuts by the
    table's size)."""
    apply = getattr(sys.modules[type(attention).__module__], "apply_rotary_pos_emb", None)
    if apply is None:
        return "its attention module has no apply_rotary_pos_emb, so which dims RoPE turns together is unknown"
    d = attention.head_dim
    sliced = isinstance(getattr(attention, "rotary_ndims", None), int)
    factor = (getattr(config, "rope_parameters", None) or {}).get("partial_rotary_factor", 1.0)
    r = attention.rotary_ndims if sliced else int(d * factor)
    order = _probe(apply, r if sliced else d, r) if 0 < r <= d and r % 2 == 0 else None
    if order is None:
        return ("its rotary embedding turns head dims other than in pairs i, i + r/2 or 2i, 2i + 1 by frequency i, "
                "the first r dims of each head")
    return RotaryLayout(d, r, torch.cat([order, torch.arange(r, d)]), apply, sliced)


def _probe(apply: _Apply, size: int, r: int) -> torch.Tensor | None:
    """The canonical order of the r turned dims, from where `apply` sends each unit vector of `size` dims; None
    unless it turns the first r pair by pair (each towards exactly one other, at one frequency shared by both) and
    passes the others unchanged."""
    half = r // 2
    angles = torch.arange(1, half + 1, dtype=torch.float64) / (half + 1)  # distinct, in (0, 1) rad
    table = torch.cat([angles, angles])[None, None].expand(1, size, r)
    units = torch.eye(size, dtype=torch.float64)[None, None]
    try:
        turned = apply(units, units, table.cos(), table.sin())[0][0, 0].double()  # row i: where e_i goes
    except (RuntimeError, ValueError, TypeError, IndexError):
        return None
    if turned.shape != (size, size) or not torch.allclose(turned[r:], units[0, 0, r:], atol=1e-5):
        return None
    pair_of = (turned.diagonal()[:r, None] - angles.cos()[None]).abs().argmin(1)  # frequency of each dim
    firsts, seconds = [None] * half, [None] * half
    for i in range(r):
        p = int(pair_of[i])
        off = turned[i].clone()
        off[i] = 0
        j = int(off.abs().argmax())
        if not (abs(turned[i, i] - angles[p].cos()) < 1e-5 and abs(off[j].abs() - angles[p].sin()) < 1e-5
                and off.abs().sum() - off[j].abs() < 1e-5 and j < r and int(pair_of[j]) == p
                and abs(turned[j, i] + off[j]) < 1e-5):
            return None
        if off[j] > 0:
            if firsts[p] is not None:
                return None
            firsts[p], seconds[p] = i, j
    if None in firsts:
        return None
    return torch.tensor(firsts + seconds)
