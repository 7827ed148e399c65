"""How a group's keys become one shared key, with or without q/k norms between the projection and RoPE.

Notation as in `fit.py`: family f is one KV head with its query heads; k_f = W_f x its pre-RoPE key; RoPE
turns each pair p (dims p and p + d/2, in the canonical dim order of `rotary.py`) by e^{i theta_p t}. A group of
families shares one key, and whatever maps each family's key onto the shared one must move into that family's
queries without changing q . RoPE(k).

Plain attention (no norm): any complex scalar per pair commutes with RoPE, so k_f ~ c_f z and conj(c_f) goes into
the query rows (`fit.fit_keys`, `fit.absorb_into_queries`); with partial rotary, the d - r unrotated dims take any
invertible real map instead, k_f ~ A_f u with A_f^T into the query rows (`fit.fit_subspace`). The fit runs in the
canonical order (turned pairs as halves, then unrotated dims) and its rows go back to the module's own order.

A norm after the projection, k = w * N(W x) (N divides by the root mean square; w the norm's weight, including
an offset such as Gemma's 1 + w), breaks that in two ways:
- N removes the key's magnitude, so a scale on the pre-norm key no longer reaches the logits, and a complex
  scale moved into q_proj rows changes the query's norm too (its N divides it out again);
- w sits between N and RoPE: a rotation within a pair commutes with RoPE but not with diag(w) unless w is equal
  on both dims of the pair, so a phase cannot pass through w.
What still passes through exactly, and therefore what the fit may use:
- per-head norms with one weight shared by every head (Qwen3, Gemma-3: q_norm/k_norm of size head_dim): only
  a real scalar per family. N(s z) = sign(s) N(z), and N is odd, so the sign moves into the family's q_proj rows;
  the magnitude is simply lost. The fit is the real rank-1 fit of the families' keys each divided by its own root
  mean square (the direction N keeps), weighted per pair by the norm weight and the query energy (the summed real
  part of `fit.key_stats`' Gram matrices): the shared pre-norm key is sum_f v_f W_f / r_f for the top
  eigenvector v, and sign(v_f) goes into queries. The norm weights stay as they are (they are shared).
- one norm over the whole projection with a weight per head and dim (OLMo-2: q_norm over H d, k_norm over K d):
  N divides every head by one root mean square per token, r(x), which a conversion that keeps each group's
  energy keeps on average. So the fit runs in the linear, "effective" space diag(w_f) W_f / r (r: the expected
  root mean square), with a real scalar per pair (`fit.fit_keys` on the real part of the Gram matrices): a real
  per-pair scale commutes with RoPE and with diag(w), and moves exactly into the query head's own q_norm weight
  entries, leaving q_proj and r_q(x) untouched. The group's new k_norm weight is sqrt(mean_f w_f^2) per dim and
  its k_proj rows the shared effective key divided by it, rescaled (weight down, rows up) so the group keeps its
  families' mean energy and with it r(x).
Where keys are copies within a group both fits are exact: the families' normalised keys are equal, the Gram
matrices have rank one, and the signs/scales found are 1. Softmax temperatures cannot be absorbed into q_proj
under a query norm (N would divide them out), so none are fitted for normed attention; the o_proj refit and the
refinement still run.

q/k LayerNorms, LN(z) = w * (z - mean(z)) / std(z) (+ b) per head (Cohere's q_norm/k_norm with a weight per head,
StableLM's and Phi's qk_layernorm), let nothing pass: the mean subtraction does not commute with a rotation within a
rotary pair, so no complex scale passes; a real scale per pair would have to be equal on both dims of every pair to
commute with w (StableLM's and Cohere's weights differ per head), and a bias does not pass even a sign (Phi). So
the keys are not fitted: `PooledKeys` shares each group's keys as `--method mean` does (consecutive heads, k_proj
rows and the k norm's per-head weights averaged), which is exact where the heads are copies; the values, o_proj and
the refinement are fitted as for any attention, and the plan says so in one line (support.py).

clip_qkv (OLMo) clips q, k and v to [-c, c] after the projection: a clip commutes with no map but the identity, so
neither a key's scale nor a value's map may move into q_proj or o_proj, nor may a temperature. There the keys and the
values are both pooled (`PooledKeys`, `fit.mean_rows`), exact where heads are copies; o_proj's refit and the
refinement, which trains through the clip, are what calibration adds.

ALiBi (a Falcon option) adds a bias to each query head's logits by that head's index and the distance: a regrouping
would give a head another's slope, and the key fits assume RoPE's turns (or none), not a bias. There the keys are
pooled in consecutive groups (query heads in place), and the values, o_proj and the refinement are fitted.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn
from transformers import PretrainedConfig

from gqa_uptrain.convert.calibration import fit
from gqa_uptrain.convert.calibration.rotary import RotaryLayout
from gqa_uptrain.convert.methods.base import grouped

NormKind = Literal["per_head", "whole", "layer"]  # layer: q/k LayerNorms, keys pooled
_PROBE = 100.0  # N(c * ones) = w / sqrt(1 + eps / c^2): w to 1e-10 for any usual eps


@dataclass(frozen=True)
class QKNorms:
    """The q/k norms of one attention layer: their kind and effective weights tiled to one entry per projection row
    ([H d] and [K d]), and `offset`, effective minus stored weight (Gemma stores w for 1 + w)."""

    kind: NormKind
    q: torch.Tensor
    k: torch.Tensor
    offset: float

    def stored(self, effective: torch.Tensor) -> torch.Tensor:
        return effective - self.offset


def norm_kind(attention: nn.Module, query_heads: int, kv_heads: int) -> NormKind | None | str:
    """The kind of the attention's q/k norms (works on the meta device); None when it has none, a reason string
    when it has norms the fits do not model."""
    q_norm, k_norm = _qk_norms(attention)
    if q_norm is None and k_norm is None:
        return None
    if q_norm is not None and k_norm is not None and _is_layer_norm(q_norm) and _is_layer_norm(k_norm):
        return "layer"
    if q_norm is None or k_norm is None or not _is_rms_norm(q_norm) or not _is_rms_norm(k_norm):
        return "its q/k norms are neither a pair of RMS norms nor a pair of LayerNorms"
    d = attention.head_dim
    sizes = (tuple(q_norm.weight.shape), tuple(k_norm.weight.shape))
    if sizes == ((d,), (d,)):
        return "per_head"
    if sizes == ((query_heads * d,), (kv_heads * d,)):
        return "whole"
    return f"its q/k norm weights have shapes {[list(s) for s in sizes]}, which no fit models"


def find_norms(attention: nn.Module, query_heads: int, kv_heads: int) -> QKNorms | None:
    """The attention's q/k norms with their effective weights (a supported kind: see `norm_kind`)."""
    kind = norm_kind(attention, query_heads, kv_heads)
    if kind is None:
        return None
    assert kind in ("per_head", "whole"), kind  # "layer": PooledKeys; support.py refuses the rest before any work
    q_rows, k_rows = (query_heads, kv_heads) if kind == "per_head" else (1, 1)
    q_norm, k_norm = _qk_norms(attention)
    q, k = _effective(q_norm), _effective(k_norm)
    offset = round(float((k - k_norm.weight.double()).mean()), 6)  # 0, or 1 for Gemma's 1 + w
    return QKNorms(kind, q.repeat(q_rows), k.repeat(k_rows), offset)


def _is_rms_norm(norm: nn.Module) -> bool:
    """An RMS norm only divides by a positive per-token factor: N(-x) = -N(x), N(s x) = N(x) for s > 0, and unlike
    a LayerNorm it keeps a constant vector (N(ones) = w, not 0)."""
    weight = getattr(norm, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 1 or getattr(norm, "bias", None) is not None:
        return False
    norm = copy.deepcopy(norm).to_empty(device="cpu")  # a probe with weights of its own, also for meta modules
    with torch.no_grad():
        norm.weight.copy_(torch.rand(weight.shape, generator=torch.Generator().manual_seed(1)) + 0.5)
        x = torch.randn(3, weight.shape[0], generator=torch.Generator().manual_seed(0))
        return bool(torch.allclose(norm(x * 2), norm(x), rtol=1e-4, atol=1e-5)
                    and torch.allclose(norm(-x), -norm(x), rtol=1e-4, atol=1e-5)
                    and norm(torch.ones_like(x)).abs().max() > 0)


def _qk_norms(attention: nn.Module) -> tuple[nn.Module | None, nn.Module | None]:
    """The attention's query and key norms: q_norm/k_norm, or q_layernorm/k_layernorm (StableLM, Phi, LFM2), whatever
    they compute (their kind is read from what they do, not from their names)."""
    for q, k in (("q_norm", "k_norm"), ("q_layernorm", "k_layernorm")):
        if hasattr(attention, q) or hasattr(attention, k):
            return getattr(attention, q, None), getattr(attention, k, None)
    return None, None


def _is_layer_norm(norm: nn.Module) -> bool:
    """A LayerNorm over the head dim (one weight per head allowed, or one module per head as StableLM has): it
    removes the mean, N(x + c) = N(x)."""
    per_head = getattr(norm, "norms", None)
    norm = per_head[0] if isinstance(per_head, nn.ModuleList) else norm
    weight = getattr(norm, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() not in (1, 2):
        return False
    norm = copy.deepcopy(norm).to_empty(device="cpu")
    with torch.no_grad():
        for param in norm.parameters():
            param.copy_(torch.rand(param.shape, generator=torch.Generator().manual_seed(1)) + 0.5)
        x = torch.randn(3, *weight.shape, generator=torch.Generator().manual_seed(0))
        return bool(torch.allclose(norm(x + 3.0), norm(x), rtol=1e-4, atol=1e-4))


def _effective(norm: nn.Module) -> torch.Tensor:
    """The per-dim factor the norm applies after dividing by the root mean square (w, or 1 + w for Gemma)."""
    with torch.no_grad():
        ones = torch.full_like(norm.weight, _PROBE)
        return norm(ones[None])[0].detach().double()


@dataclass(frozen=True)
class GroupKeys:
    """One group's shared key rows [d, D'] (in the module's dim order), its k_norm weight (effective, [d],
    whole-projection norms only), and what moves into each family's queries: `scales` [m, r/2], complex (into q
    rows), real (into the q_norm weight), or [m] signs (into q rows); `maps` [m, d - r, d - r] for the dims RoPE
    leaves unrotated (partial rotary), None where it turns them all."""

    rows: torch.Tensor
    norm: torch.Tensor | None
    scales: torch.Tensor
    maps: torch.Tensor | None = None


class KeyFitter:
    """The key fit of one layer for its norm kind and rotary layout: `loss(group)` to choose the groups by,
    `fit(group)` for the shared key, `queries(...)` to move a family's scale into one query head.

    Without norms the fit runs in the layout's canonical dim order (`rotary.py`): the r turned dims as `fit.fit_keys`
    pairs them, the d - r unrotated ones by `fit.fit_subspace`. Norms are fitted only where RoPE turns every dim in
    halves (support.py), so their per-dim weights need no reordering."""

    def __init__(self, wq: torch.Tensor, wk: torch.Tensor, sigma: torch.Tensor, rotary: RotaryLayout,
                 mean: torch.Tensor | None, still: torch.Tensor | None, norms: QKNorms | None) -> None:
        self.sigma, self.head_dim, self.norms, self.rotary = sigma, rotary.head_dim, norms, rotary
        if norms is None:
            self._split(rotary.canonical(wq), rotary.canonical(wk), sigma, mean, still)
            return
        self.wk = wk
        self.q_eff = self._linearized(wq, norms.q)
        self.k_eff = self._linearized(wk, norms.k)
        stats = fit.key_stats(self.q_eff, self.k_eff, sigma, self.head_dim, mean, still)
        real = stats.gram.real
        self.stats = fit.KeyStats(real.sum(0, keepdim=True) if norms.kind == "per_head" else real, stats.weights)

    def _split(self, wq: torch.Tensor, wk: torch.Tensor, sigma: torch.Tensor, mean: torch.Tensor | None,
               still: torch.Tensor | None) -> None:
        """Turned and unrotated rows apart (canonical order), the turned pairs' statistics, and for the unrotated
        dims what an error costs: grams_f = sum over f's query heads of E[q q^T] (q . e is the logit error), with
        the keys' constant part left out (a constant unrotated key adds one logit to every key: softmax ignores it)."""
        d, r = self.head_dim, self.rotary.rotary
        q_heads, k_heads = wq.reshape(-1, d, wq.shape[-1]), wk.reshape(-1, d, wk.shape[-1])
        self.wk = k_heads[:, :r].reshape(-1, wk.shape[-1])
        self.stats = fit.key_stats(q_heads[:, :r].reshape(-1, wq.shape[-1]), self.wk, sigma, r, mean, still)
        self.k_pass = k_heads[:, r:].reshape(-1, wk.shape[-1])
        per_family = q_heads.shape[0] // k_heads.shape[0]
        q_pass = q_heads[:, r:].reshape(k_heads.shape[0], per_family, d - r, wq.shape[-1])  # [K, H/K, d - r, D']
        self.pass_grams = torch.einsum("fjra,ab,fjsb->frs", q_pass, sigma, q_pass)
        self.key_sigma = sigma if mean is None else sigma - mean[:, None] * mean[None]

    def choose(self, families: int, groups: int) -> list[tuple[int, ...]]:
        """The grouping with the least key loss (`fit.choose_groups`)."""
        return fit.choose_groups(self.loss, families, groups)

    def loss(self, group: tuple[int, ...]) -> float:
        """What the group's shared key leaves, in weighted logit energy (turned pairs plus unrotated dims)."""
        lost = fit.key_loss(self.stats, group)
        if self.norms is None and self.rotary.passed:
            lost += fit.subspace_loss(self.k_pass, self.pass_grams, self.key_sigma, group, self.rotary.passed)
        return lost

    def _linearized(self, w: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """diag(w) W / r_h: what the normed projection is, with each head's root mean square r_h at its expected
        value. A whole-projection norm divides every head by one r, which changes no fit: it is left out."""
        if self.norms.kind == "whole":
            return w * weight[:, None]
        heads = w.reshape(-1, self.head_dim, w.shape[-1])
        rms = (torch.einsum("hra,ab,hrb->h", heads, self.sigma, heads) / self.head_dim).clamp_min(fit._EPS).sqrt()
        return (heads / rms[:, None, None]).reshape(w.shape) * weight[:, None]

    def fit(self, group: tuple[int, ...]) -> GroupKeys:
        if self.norms is None:
            return self._fit_plain(group)
        if self.norms.kind == "per_head":
            return self._fit_per_head(group)
        return self._fit_whole(group)

    def _fit_plain(self, group: tuple[int, ...]) -> GroupKeys:
        """Complex scales on the turned pairs, maps on the unrotated dims, back in the module's dim order."""
        rows, scales = fit.fit_keys(self.wk, self.stats, group, self.rotary.rotary)
        passed, maps = self.rotary.passed, None
        if passed:
            shared, maps = fit.fit_subspace(self.k_pass, self.pass_grams, self.key_sigma, group, passed)
            heads = self.k_pass.reshape(-1, passed, self.k_pass.shape[-1])[list(group)]
            energy = torch.einsum("fra,ab,frb->", heads, self.key_sigma, heads) / len(group)
            balance = (energy / torch.einsum("ra,ab,rb->", shared, self.key_sigma, shared).clamp_min(fit._EPS)).sqrt()
            rows, maps = torch.cat([rows, shared * balance]), maps / balance  # the group's mean key energy
        return GroupKeys(self.rotary.restore(rows), None, scales, maps)

    def _fit_per_head(self, group: tuple[int, ...]) -> GroupKeys:
        """Shared pre-norm key sum_f v_f W_f / r_f (top eigenvector v of the summed real Gram), at the group's
        mean root mean square; each family keeps sign(v_f)."""
        index = torch.tensor(group, device=self.wk.device)
        _, vectors = torch.linalg.eigh(self.stats.gram[0][index][:, index])
        top = _positive(vectors[:, -1])
        heads = self.wk.reshape(-1, self.head_dim, self.wk.shape[-1])[index]
        rms = torch.einsum("hra,ab,hrb->h", heads, self.sigma, heads).div(self.head_dim).clamp_min(fit._EPS).sqrt()
        shared = torch.einsum("f,fra->ra", top / rms, heads)
        shared_rms = torch.einsum("ra,ab,rb->", shared, self.sigma, shared).div(self.head_dim).clamp_min(fit._EPS)
        signs = torch.where(top < 0, -1.0, 1.0).to(top.dtype)
        return GroupKeys(shared * rms.mean() / shared_rms.sqrt(), None, signs)

    def _fit_whole(self, group: tuple[int, ...]) -> GroupKeys:
        """`fit.fit_keys` with real per-pair scales in the effective space diag(w) W, split back into k_norm weight
        and k_proj rows that keep the group's mean energy."""
        d = self.head_dim
        effective, scales = fit.fit_keys(self.k_eff, self.stats, group, d)
        weights = self.norms.k.reshape(-1, d)[list(group)]
        norm = weights.pow(2).mean(0).sqrt().clamp_min(fit._EPS)
        rows = effective / norm[:, None]
        heads = self.wk.reshape(-1, d, self.wk.shape[-1])[list(group)]
        target = torch.einsum("hra,ab,hrb->", heads, self.sigma, heads) / len(group)
        actual = torch.einsum("ra,ab,rb->", rows, self.sigma, rows).clamp_min(fit._EPS)
        balance = (target / actual).sqrt()
        return GroupKeys(rows * balance, norm / balance, scales)

    def queries(self, keys: GroupKeys, i: int, rows: torch.Tensor, norm: torch.Tensor | None
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Query head rows [d, D'] (and its effective q_norm weight [d]) of the group's i-th family, with that
        family's scale moved in: conj(c) on each turned pair, and Q_f^T on the unrotated dims (q . Q_f u equals
        Q_f^T q . u)."""
        if self.norms is None:
            canonical, r = self.rotary.canonical(rows), self.rotary.rotary
            turned = fit.absorb_into_queries(canonical[:r], keys.scales[i][None], r)
            moved = turned if keys.maps is None else torch.cat([turned, keys.maps[i].T @ canonical[r:]])
            return self.rotary.restore(moved), norm
        if self.norms.kind == "per_head":
            return rows * keys.scales[i], norm
        return rows, norm * keys.scales[i].real.repeat(2)


@dataclass(frozen=True)
class Fallback:
    """Where some fits fall back to mean pooling: why (completing "<model type>... each group's keys ..."), and whether
    the values are pooled too."""

    why: str
    values: bool

    def note(self, model_type: str) -> str:
        """The one line the plan prints (support.py)."""
        pooled = ("keys and values are mean-pooled (consecutive heads, exact where they are copies); o_proj is "
                  "refitted and each layer refined" if self.values else
                  "keys are mean-pooled (consecutive heads, exact where they are copies); the values and o_proj are "
                  "fitted and each layer refined")
        return f"note: --method calibrated: {model_type}{self.why} each group's {pooled}"


def fallback(config: PretrainedConfig, attention: nn.Module) -> Fallback | None:
    """What stops the key (and value) fits of this attention, as the module docstring derives, or None: clip_qkv
    (keys and values pooled), ALiBi or q/k LayerNorms (keys pooled)."""
    clip = getattr(config, "clip_qkv", None)
    if clip is not None:
        return Fallback(f" clips q/k/v to +-{clip:g} after the projection, which no map moved into q_proj or o_proj "
                        "passes, so", values=True)
    if getattr(config, "alibi", False):
        return Fallback(" adds ALiBi biases by query head, so the query heads keep their order and", values=False)
    if norm_kind(attention, config.num_attention_heads, config.num_key_value_heads) == "layer":
        return Fallback("'s q/k LayerNorms let no scale pass into the queries, so", values=False)
    return None


class PooledKeys:
    """The keys where nothing may move into the queries (q/k LayerNorms, clip_qkv, ALiBi: the module docstring),
    shared as `--method mean` shares them: consecutive families form a group, its key rows are their mean."""

    def __init__(self, wk: torch.Tensor, head_dim: int) -> None:
        self.wk, self.head_dim = wk, head_dim

    def choose(self, families: int, groups: int) -> list[tuple[int, ...]]:
        return fit.consecutive_groups(families, groups)

    def fit(self, group: tuple[int, ...]) -> GroupKeys:
        return GroupKeys(fit.mean_rows(self.wk, group, self.head_dim), None, torch.ones(len(group)))

    def queries(self, keys: GroupKeys, i: int, rows: torch.Tensor, norm: torch.Tensor | None
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
        return rows, norm


def pooled_key_norms(attention: nn.Module, groups: int) -> dict[str, torch.Tensor]:
    """The k LayerNorm's parameters that hold one entry per KV head, averaged over consecutive groups as `PooledKeys`
    groups the keys, by their names in the converted attention: Cohere's k_norm weight [K, d] -> [G, d], StableLM's
    k_layernorm.norms.{i} -> norms.{g}. A norm shared by all heads (Phi's) is left as it is."""
    pooled = {name: grouped(param.detach(), groups).mean(1) for name, param in attention.named_parameters()
              if name.startswith("k_norm.") and param.dim() == 2}
    norms = getattr(getattr(attention, "k_layernorm", None), "norms", None)
    if norms is not None:
        for kind, _ in norms[0].named_parameters():
            heads = torch.stack([norm.get_parameter(kind).detach() for norm in norms])
            pooled |= {f"k_layernorm.norms.{g}.{kind}": mean for g, mean in enumerate(grouped(heads, groups).mean(1))}
    return pooled


def _positive(vector: torch.Tensor) -> torch.Tensor:
    """An eigenvector's sign is arbitrary: pick the one whose entries sum to a positive number, so copies get +1."""
    return -vector if vector.sum() < 0 else vector
