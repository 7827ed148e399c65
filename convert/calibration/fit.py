"""The closed-form fits of a calibrated conversion, for one attention layer, from activation statistics.

Shapes: D inputs (plus one constant column when the projections have biases), d head size, H query heads,
K source KV heads (a "family" is one KV head with its H/K query heads), G target KV heads, m = K/G families per
group. Projection weights are augmented matrices [rows, D'] whose last column is the bias when there is one.

Why each fit keeps the function:
- values enter attention linearly, so a group's stacked values s = [v_1..v_m] are replaced by their best rank-d
  approximation Q Q^T s (principal directions of s, weighted by how much o_proj reads each head); head f then
  sees Q_f u, and Q_f moves into that head's o_proj columns;
- keys are rotated by RoPE, which multiplies each frequency pair (dims i and i + d/2, transformers' rotate_half)
  by e^{i theta t}. A complex scalar per pair commutes with that rotation, so each family's pre-RoPE key is fitted
  as c_f * z with one shared complex key z per pair (the best rank-1 fit, weighted by the query energy), and
  conj(c_f) moves into that family's query rows: q . k is kept as far as rank one allows. Other pairings
  (interleaved, Helium) are this one after a permutation of head dims (`rotary.py`);
- dims RoPE leaves unrotated (partial rotary: StableLM, Phi) enter the logit as a plain dot product q_p . k_p, so
  any invertible real map passes: k_f = A_f u gives q_p . k_f = (A_f^T q_p) . u, and A_f^T moves into the family's
  query rows. The shared u is fitted as the values are (`fit_subspace`: the best rank-(d - r) approximation of the
  stacked keys, weighted by each family's query second moment, so the error is the expected squared logit error),
  with the keys' constant part left out: a constant unrotated key adds one logit to every key of a query, which
  softmax ignores. A_f is not a scalar per dim but a whole map, so the unrotated dims may also be re-mixed.
Where a group's families are copies, every fit is exact: a complex scale per pair of 1, maps A_f, Q_f that
reproduce the copies (the stacked rows have rank d), whatever the weights.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Callable

import torch

_EPS = 1e-12


def augment(weight: torch.Tensor, bias: torch.Tensor | None, with_bias: bool) -> torch.Tensor:
    """[rows, D] weight (+ bias) -> [rows, D'] with the bias as the last column when the layer uses biases."""
    if not with_bias:
        return weight.double()
    column = bias if bias is not None else torch.zeros(weight.shape[0], dtype=weight.dtype, device=weight.device)
    return torch.cat([weight, column[:, None]], dim=1).double()


def split_bias(augmented: torch.Tensor, with_bias: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    return (augmented[:, :-1], augmented[:, -1]) if with_bias else (augmented, None)


def _complex_rows(w: torch.Tensor, head_dim: int) -> torch.Tensor:
    """[heads * d, D'] real rows -> [heads, d/2, D'] complex: pair i is row i + 1j * row i + d/2 of each head."""
    heads = w.reshape(-1, head_dim, w.shape[-1])
    half = head_dim // 2
    return torch.complex(heads[:, :half], heads[:, half:])


def _real_rows(z: torch.Tensor) -> torch.Tensor:
    """Inverse of `_complex_rows`: [heads, d/2, D'] complex -> [heads * d, D'] real."""
    return torch.cat([z.real, z.imag], dim=1).reshape(-1, z.shape[-1])


@dataclass(frozen=True)
class KeyStats:
    """Per frequency pair, the weighted Gram matrix of every family's complex key: [d/2, K, K] Hermitian."""

    gram: torch.Tensor
    weights: torch.Tensor  # [K, d/2] query energy of each family and pair


def key_stats(wq: torch.Tensor, wk: torch.Tensor, sigma: torch.Tensor, head_dim: int,
              mean: torch.Tensor | None = None, still: torch.Tensor | None = None) -> KeyStats:
    """Gram matrices of the families' keys scaled by sqrt(query energy), from the input second moment `sigma`.

    A key component that is constant over positions adds the same logit to every key a query sees, which softmax
    ignores, as long as RoPE barely turns it within the context. `still` [d/2] is that share per pair (1: does
    not turn, 0: turns all the way round), and `mean` the mean input: so much of the mean key is left out of the
    fit, which then spends its one rank on what moves the attention.
    """
    kv_heads = wk.shape[0] // head_dim
    q = _complex_rows(wq, head_dim)  # [H, d/2, D']
    energy = torch.einsum("hpa,ab,hpb->hp", q.conj(), sigma.to(q.dtype), q).real  # E|q_hp|^2
    weights = energy.reshape(kv_heads, -1, head_dim // 2).sum(1).clamp_min(_EPS)  # per family
    k = _complex_rows(wk, head_dim) * weights.sqrt()[..., None]  # [K, d/2, D']
    gram = torch.einsum("fpa,ab,gpb->pfg", k.conj(), sigma.to(k.dtype), k)
    if mean is not None and still is not None:
        m = torch.einsum("fpa,a->pf", k, mean.to(k.dtype))  # mean key of each family and pair
        gram = gram - still.to(gram.real.dtype)[:, None, None] * m.conj()[:, :, None] * m[:, None, :]
    return KeyStats(gram, weights)


def still_share(inv_freq: torch.Tensor, length: int) -> torch.Tensor:
    """Per pair, |mean over offsets 0..length-1 of e^{i theta offset}|^2: how little RoPE turns it in a context."""
    offsets = torch.arange(length, dtype=torch.float64, device=inv_freq.device)
    angles = inv_freq.double()[:, None] * offsets
    return torch.cos(angles).mean(1) ** 2 + torch.sin(angles).mean(1) ** 2


def key_loss(stats: KeyStats, group: tuple[int, ...]) -> float:
    """What a rank-1 shared key leaves of this group's weighted key energy (trace minus the top eigenvalue)."""
    index = torch.tensor(group, device=stats.gram.device)
    sub = stats.gram[:, index][:, :, index]
    values = torch.linalg.eigvalsh(sub)
    return float((values.sum(-1) - values[:, -1]).sum())


def choose_groups(loss: Callable[[tuple[int, ...]], float], families: int, groups: int, max_exhaustive: int = 3000
                  ) -> list[tuple[int, ...]]:
    """Which families share a KV head: the partition into equal groups with the least summed `loss` (what one
    group's shared key leaves, e.g. `key_loss`; the same for any order of its families).

    Exhaustive when the partitions are few (8 heads: at most 105), else greedy seeding plus pairwise swaps.
    """
    size = families // groups
    if groups == 1 or size == 1:
        return consecutive_groups(families, groups)
    seen: dict[tuple[int, ...], float] = {}

    def cached(group: tuple[int, ...]) -> float:
        key = tuple(sorted(group))
        if key not in seen:
            seen[key] = loss(key)
        return seen[key]

    if _partition_count(families, size) <= max_exhaustive:
        best = min(_partitions(tuple(range(families)), size), key=lambda p: sum(cached(g) for g in p))
        return sorted(best)
    return _greedy_groups(cached, families, size)


def consecutive_groups(families: int, groups: int) -> list[tuple[int, ...]]:
    """Families in order, `families // groups` to a group: the grouping --method mean uses."""
    size = families // groups
    return [tuple(range(g * size, (g + 1) * size)) for g in range(groups)]


def _partition_count(n: int, size: int) -> int:
    return math.factorial(n) // (math.factorial(size) ** (n // size) * math.factorial(n // size))


def _partitions(items: tuple[int, ...], size: int):
    if not items:
        yield []
        return
    first, rest = items[0], items[1:]
    for others in itertools.combinations(rest, size - 1):
        remaining = tuple(i for i in rest if i not in others)
        for tail in _partitions(remaining, size):
            yield [(first, *others), *tail]


def _greedy_groups(loss: Callable[[tuple[int, ...]], float], families: int, size: int) -> list[tuple[int, ...]]:
    left = list(range(families))
    groups: list[list[int]] = []
    while left:
        group = [left.pop(0)]
        while len(group) < size:
            best = min(left, key=lambda f: loss(tuple(group + [f])))
            group.append(best)
            left.remove(best)
        groups.append(group)
    improved = True
    while improved:  # swap two families between groups while that lowers the total loss
        improved = False
        for a, b in itertools.combinations(range(len(groups)), 2):
            for i, j in itertools.product(range(size), range(size)):
                before = loss(tuple(groups[a])) + loss(tuple(groups[b]))
                ga, gb = groups[a].copy(), groups[b].copy()
                ga[i], gb[j] = gb[j], ga[i]
                if loss(tuple(ga)) + loss(tuple(gb)) < before - 1e-9 * abs(before):
                    groups[a], groups[b], improved = ga, gb, True
    return sorted(tuple(sorted(g)) for g in groups)


def fit_keys(wk: torch.Tensor, stats: KeyStats, group: tuple[int, ...], head_dim: int
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """The group's shared key rows [d, D'] and each family's complex scale per pair [m, d/2] (key_f ~ c_f z).

    With real Gram matrices (`stats.gram` of a real dtype) the scales are real, signed so that copies get +1."""
    index = torch.tensor(group, device=wk.device)
    sub = stats.gram[:, index][:, :, index]  # [d/2, m, m]
    _, vectors = torch.linalg.eigh(sub)
    top = vectors[:, :, -1]  # [d/2, m], unit
    if not top.is_complex():
        top = torch.where(top.sum(-1, keepdim=True) < 0, -top, top)
    k = _complex_rows(wk, head_dim)[index] * stats.weights[index].sqrt()[..., None]  # [m, d/2, D']
    top = top.to(k.dtype)
    shared = torch.einsum("pf,fpa->pa", top, k)  # z = sum_f v_f k'_f
    scale = top.conj().T / stats.weights[index].sqrt()  # c_f = conj(v_f) / sqrt(E_f): [m, d/2]
    norm = scale.abs().mean(0).clamp_min(_EPS)  # balance the magnitudes of keys and queries
    return _real_rows((shared * norm[:, None])[None]), scale / norm


def absorb_into_queries(wq: torch.Tensor, scale: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Multiply each query pair by conj(c): q . (c z) under RoPE equals (conj(c) q) . z. wq: [r * d, D']."""
    q = _complex_rows(wq, head_dim) * scale.conj()[..., None]
    return _real_rows(q)


def fit_subspace(rows: torch.Tensor, grams: torch.Tensor, sigma: torch.Tensor, group: tuple[int, ...], dim: int
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Shared rows u [dim, D'] and maps Q_f [m, dim, dim] with rows_f ~ Q_f u for each family f of the group.

    rows: [K * dim, D'], each family's block; grams: [K, dim, dim], how much an error in each of f's dims costs
    (an error e in rows_f x costs e^T grams_f e). With M_f = grams_f^(1/2) the stacked [M_f rows_f] are replaced by
    their best rank-dim approximation top top^T [M_f rows_f] under the input second moment `sigma`; so
    u = top^T [M_f rows_f] and Q_f = M_f^-1 top_f. Exact where the families' rows are maps of one another's.
    """
    stacked, inverses = _weighted_stack(rows, grams, group, dim)
    _, vectors = torch.linalg.eigh(stacked @ sigma @ stacked.T)
    top = vectors[:, -dim:].flip(-1)  # [m dim, dim]
    maps = torch.stack([inverses[i] @ top[i * dim:(i + 1) * dim] for i in range(len(group))])
    return top.T @ stacked, maps


def subspace_loss(rows: torch.Tensor, grams: torch.Tensor, sigma: torch.Tensor, group: tuple[int, ...], dim: int
                  ) -> float:
    """What `fit_subspace` leaves of the group's weighted energy (trace minus the top `dim` eigenvalues)."""
    stacked, _ = _weighted_stack(rows, grams, group, dim)
    values = torch.linalg.eigvalsh(stacked @ sigma @ stacked.T)
    return float(values[:-dim].clamp_min(0).sum())


def _weighted_stack(rows: torch.Tensor, grams: torch.Tensor, group: tuple[int, ...], dim: int
                    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """[M_f rows_f] stacked over the group [m dim, D'], and each M_f^-1 (directions an error does not cost in are
    floored, not inverted: what lies there does not matter)."""
    stacked, inverses = [], []
    for f in group:
        values, vectors = torch.linalg.eigh(grams[f])
        root = values.clamp_min(0).sqrt()
        floor = root.max() * 1e-6 + _EPS
        stacked.append(vectors * root @ vectors.T @ rows[f * dim:(f + 1) * dim])
        inverses.append(vectors * (1 / root.clamp_min(floor)) @ vectors.T)
    return torch.cat(stacked), inverses


def fit_values(wv: torch.Tensor, wo: torch.Tensor, sigma: torch.Tensor, group: tuple[int, ...], head_dim: int,
               per_family: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The group's shared value rows [d, D'] and the maps Q_f [m, d, d] with v_f ~ Q_f u (`fit_subspace`).

    An error in v_f costs what o_proj reads of it: grams_f = sum over f's query heads of W_o_j^T W_o_j, with wo
    o_proj's weight [D, H * d].
    """
    blocks = wo.double().reshape(wo.shape[0], -1, per_family, head_dim)  # [D, K, r, d]
    grams = torch.einsum("Dfrd,Dfre->fde", blocks, blocks)
    return fit_subspace(wv, grams, sigma, group, head_dim)


def mean_rows(w: torch.Tensor, group: tuple[int, ...], head_dim: int) -> torch.Tensor:
    """The group's heads' rows [d, D'] averaged: what --method mean shares, for where no fit passes (keys.py)."""
    return w.reshape(-1, head_dim, w.shape[-1])[list(group)].mean(0)


def absorb_into_output(wo_heads: torch.Tensor, q_map: torch.Tensor) -> torch.Tensor:
    """o_proj columns of one query head [D, d] reading Q_f u instead of v_f."""
    return wo_heads.double() @ q_map


def causal_logits(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Causal attention logits of q, k [B, h, T, d] already turned by RoPE (`rotary.RotaryLayout.turn`)."""
    logits = q @ k.transpose(-1, -2)
    t = logits.shape[-1]
    mask = torch.ones(t, t, dtype=torch.bool, device=logits.device).triu(1)
    return logits.masked_fill(mask, float("-inf"))


def fit_temperature(original: torch.Tensor, converted: torch.Tensor, steps: int = 16) -> torch.Tensor:
    """Per head, the factor tau in [1/4, 4] on the converted logits that minimises KL(original || converted).

    original/converted: [B, H, T, T] causal logits (already scaled). Golden-section search on log tau, every
    head at once (the KL is unimodal in tau for a fixed logit pattern).
    """
    p = torch.softmax(original, -1)
    finite = torch.isfinite(converted)

    def kl(tau: torch.Tensor) -> torch.Tensor:
        log_q = torch.log_softmax(converted * tau[None, :, None, None], -1)
        return -(p * torch.where(finite, log_q, 0)).sum(-1).mean((0, 2))

    lo = torch.full((original.shape[1],), math.log(0.25), dtype=original.dtype, device=original.device)
    hi = -lo
    ratio = (math.sqrt(5) - 1) / 2
    for _ in range(steps):
        a, b = hi - ratio * (hi - lo), lo + ratio * (hi - lo)
        left = kl(a.exp()) < kl(b.exp())  # the minimum lies in [lo, b]
        hi, lo = torch.where(left, b, hi), torch.where(left, lo, a)
    tau = ((lo + hi) / 2).exp()
    return torch.where(kl(tau) < kl(torch.ones_like(tau)) - 1e-6, tau, torch.ones_like(tau))


def refit_output(gram: torch.Tensor, cross: torch.Tensor, prior: torch.Tensor, held_gram: torch.Tensor,
                 held_cross: torch.Tensor, held_target: float,
                 strengths: tuple[float, ...] = (1e-1, 1e-2, 1e-3)) -> torch.Tensor:
    """o_proj refitted by ridge regression towards `prior`, or `prior` itself when no strength helps held-out data.

    gram = A^T A and cross = A^T Y over the fitting tokens (A: the converted attention's o_proj input on the
    converted model's own activations; Y: the original attention output); held_* the same over held-out
    calibration tokens, held_target = sum |Y|^2 there. prior: [D, H d]. Returns [D, H d].
    """
    def held_error(w: torch.Tensor) -> float:  # |A W^T - Y|^2 expanded
        return float(torch.einsum("ij,ki,kj->", held_gram, w, w) - 2 * torch.einsum("ik,ki->", held_cross, w)
                     + held_target)

    best, best_error = prior, held_error(prior)
    scale = gram.diagonal().mean()
    eye = torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
    for strength in strengths:
        lam = strength * scale
        w = torch.linalg.solve(gram + lam * eye, cross + lam * prior.T).T
        error = held_error(w)
        if error < 0.99 * best_error - 1e-9 * held_target:  # a refit must earn its place on held-out text
            best, best_error = w, error
    return best
