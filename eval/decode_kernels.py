"""Split-KV decode attention in Triton: one query token per sequence over a static KV cache, each KV head read once.

Why: stock SDPA kernels give one program per (sequence, head) and walk the whole cache in it. With grouped-query
attention there are few KV heads, so at batch 8 a GQA-8 model gets 64 programs on a 132-SM H100, and the masked
SDPA call ran at 27% of its memory floor there (docs/benchmarks.md). Splitting the cache along its length into
enough pieces to fill the device (flash-decoding), then merging the pieces by their softmax statistics, keeps the
kernel at the speed of reading K and V once. The mask is read as given, so padding and sliding windows work.

`split_kv_decode` is a torch custom op: CUDA graphs capture it and torch.compile treats it as one opaque call.
"""

import math
from functools import lru_cache
from typing import Optional

import torch
import triton
import triton.language as tl

BLOCK_N = 64  # keys per iteration of a program
MIN_BLOCKS_PER_SPLIT = 4  # below this a program spends more on its own set-up than on reading keys


@triton.jit
def _split_kernel(
    Q, K, V, Mask, Partial, Stats,
    stride_qb, stride_qh, stride_qg,
    stride_kb, stride_kh, stride_ks,
    stride_vb, stride_vh, stride_vs,
    stride_mb, stride_ms,
    kv_heads, groups, seq_len, scale_log2,
    SPLIT_LEN: tl.constexpr, HAS_MASK: tl.constexpr, G_PAD: tl.constexpr, D: tl.constexpr, D_PAD: tl.constexpr,
    BLOCK_N: tl.constexpr, PRECISION: tl.constexpr,
):
    """One program: the G query rows of one (sequence, KV head) against one split of the cache, online softmax.

    Writes the unnormalised output rows and their running max (log2 units) and sum for the merge.
    """
    bh = tl.program_id(0)
    split = tl.program_id(1)
    b = bh // kv_heads
    h = bh % kv_heads
    g = tl.arange(0, G_PAD)
    d = tl.arange(0, D_PAD)
    n = tl.arange(0, BLOCK_N)
    q = tl.load(Q + b * stride_qb + h * stride_qh + g[:, None] * stride_qg + d[None, :],
                mask=(g[:, None] < groups) & (d[None, :] < D), other=0.0)
    m_i = tl.full([G_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([G_PAD], tl.float32)
    acc = tl.zeros([G_PAD, D_PAD], tl.float32)
    k_base = K + b * stride_kb + h * stride_kh
    v_base = V + b * stride_vb + h * stride_vh
    for offset in range(0, SPLIT_LEN, BLOCK_N):
        keys = split * SPLIT_LEN + offset + n
        valid = keys < seq_len
        in_bounds = valid[:, None] & (d[None, :] < D)
        if HAS_MASK:
            valid &= tl.load(Mask + b * stride_mb + keys * stride_ms, mask=keys < seq_len, other=0) != 0
        k = tl.load(k_base + keys[:, None] * stride_ks + d[None, :], mask=in_bounds, other=0.0)
        scores = tl.where(valid[None, :], tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale_log2, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(scores, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # nothing seen yet: keep exp2 finite
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(scores - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_base + keys[:, None] * stride_vs + d[None, :], mask=in_bounds, other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new
    rows = (bh * tl.num_programs(1) + split) * groups + g
    row_ok = g < groups
    tl.store(Partial + rows[:, None] * D + d[None, :], acc, mask=row_ok[:, None] & (d[None, :] < D))
    tl.store(Stats + rows * 2, m_i, mask=row_ok)
    tl.store(Stats + rows * 2 + 1, l_i, mask=row_ok)


@triton.jit
def _merge_kernel(Partial, Stats, Out, splits, groups, D: tl.constexpr, D_PAD: tl.constexpr,
                  SPLITS_PAD: tl.constexpr):
    """One program per output row: weight each split by exp2(its max - the max over splits) and normalise."""
    row = tl.program_id(0)  # (sequence x KV head) x group
    bh = row // groups
    g = row % groups
    s = tl.arange(0, SPLITS_PAD)
    d = tl.arange(0, D_PAD)
    split_rows = (bh * splits + s) * groups + g
    m = tl.load(Stats + split_rows * 2, mask=s < splits, other=float("-inf"))
    denom = tl.load(Stats + split_rows * 2 + 1, mask=s < splits, other=0.0)
    m_max = tl.max(m, 0)
    weight = tl.where(m == float("-inf"), 0.0, tl.exp2(m - m_max))
    acc = tl.load(Partial + split_rows[:, None] * D + d[None, :], mask=(s[:, None] < splits) & (d[None, :] < D),
                  other=0.0)
    out = tl.sum(acc * weight[:, None], 0) / tl.sum(denom * weight, 0)
    tl.store(Out + row * D + d, out.to(Out.dtype.element_ty), mask=d < D)


@lru_cache(maxsize=None)
def _multiprocessors(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _split_len(batch_heads: int, seq_len: int, device: torch.device) -> int:
    """Keys per split: enough splits for about four programs per multiprocessor, none shorter than a few blocks."""
    wanted = math.ceil(4 * _multiprocessors(device.index or 0) / batch_heads)
    splits = max(1, min(wanted, seq_len // (MIN_BLOCKS_PER_SPLIT * BLOCK_N)))
    return triton.cdiv(triton.cdiv(seq_len, splits), BLOCK_N) * BLOCK_N


@torch.library.custom_op("gqa_uptrain::split_kv_decode", mutates_args=())
def split_kv_decode(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: Optional[torch.Tensor], scale: float
) -> torch.Tensor:
    """Attention of packed queries (B, H_kv, G, D) over a cache (B, H_kv, S, D); `mask` (B, 1, 1, S) bool or None."""
    batch, kv_heads, groups, dim = query.shape
    seq_len = key.shape[2]
    split_len = _split_len(batch * kv_heads, seq_len, query.device)
    splits = triton.cdiv(seq_len, split_len)
    partial = torch.empty(batch * kv_heads * splits * groups, dim, dtype=torch.float32, device=query.device)
    stats = torch.empty(batch * kv_heads * splits * groups, 2, dtype=torch.float32, device=query.device)
    out = torch.empty(batch, kv_heads, groups, dim, dtype=query.dtype, device=query.device)
    mask_bytes = mask.view(torch.uint8) if mask is not None else query  # a placeholder pointer when there is none
    _split_kernel[(batch * kv_heads, splits)](
        query, key, value, mask_bytes, partial, stats,
        query.stride(0), query.stride(1), query.stride(2),
        key.stride(0), key.stride(1), key.stride(2),
        value.stride(0), value.stride(1), value.stride(2),
        mask_bytes.stride(0) if mask is not None else 0, mask_bytes.stride(-1) if mask is not None else 0,
        kv_heads, groups, seq_len, scale * math.log2(math.e),
        SPLIT_LEN=split_len, HAS_MASK=mask is not None, G_PAD=max(16, triton.next_power_of_2(groups)), D=dim,
        D_PAD=max(16, triton.next_power_of_2(dim)), BLOCK_N=BLOCK_N,
        PRECISION="ieee" if query.dtype == torch.float32 else "tf32",  # float32 stays float32, as in torch
    )
    _merge_kernel[(batch * kv_heads * groups,)](
        partial, stats, out, splits, groups, D=dim, D_PAD=max(16, triton.next_power_of_2(dim)),
        SPLITS_PAD=max(2, triton.next_power_of_2(splits)),
    )
    return out


@split_kv_decode.register_fake
def _(query, key, value, mask, scale):
    return torch.empty_like(query)


def supports(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: Optional[torch.Tensor]) -> bool:
    """Whether `split_kv_decode` takes this call: CUDA, last dims contiguous, one head size, a per-sequence mask."""
    return (
        query.is_cuda
        and query.shape[-1] == key.shape[-1] == value.shape[-1]
        and query.stride(-1) == key.stride(-1) == value.stride(-1) == 1
        and (mask is None or (mask.dtype == torch.bool and mask.shape[1] == 1 and mask.shape[2] == 1))
    )
