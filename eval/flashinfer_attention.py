"""FlashInfer's batch decode attention over the project's static KV cache, for comparison and optional use.

Why: FlashInfer is the attention-kernel library that serving engines (vLLM, SGLang, TensorRT-LLM's Python
front-ends) use for decode. Running its paged decode kernel on exactly the tensors our decode engine holds lets the
project set its own kernels (the split-KV Triton kernel of `decode_kernels`, the SDPA paths) against the kernel a
deployed GQA model would actually meet, and use it where it is faster.

What it computes: attention of ONE new query token per sequence with grouped KV heads. Queries come packed as
(batch, kv_heads, groups, head_dim): query head `h = kv_head * groups + g` reads KV head `h // groups`, which is the
order FlashInfer uses for `num_qo_heads = kv_heads * groups` (it maps query head h to KV head h // group_size).
The cache is transformers' StaticCache layout, `key` and `value` each (batch, kv_heads, max_len, head_dim),
contiguous, of which the first `kv_len` positions of every sequence are valid. The output is
(batch, kv_heads, groups, head_dim) in the query's dtype.

How the cache maps to FlashInfer's paged KV, with no copy (layout "HND": a page is [kv_heads, page_size, head_dim]
and FlashInfer reads every page through the tensor's strides, `paged_kv_t` in include/flashinfer/page.cuh):

- `page_size == max_len`: one page per sequence, page b is `key[b]` itself; indptr = arange(batch + 1),
  indices = arange(batch), last_page_len = kv_len. Faithful, but FlashInfer's schedulers split the KV length only
  at page boundaries (`PartitionPagedKVCacheBinarySearchMinNumPagePerBatch` for the CUDA-core decode kernel,
  `PrefillSplitQOKVIndptr` for the tensor-core one, both in attention/scheduler.cuh), so with a single page per
  sequence there is no split-KV at all: batch * kv_heads thread blocks, too few to fill an H200 at small batch.
- `page_size = P < max_len` (the default, P = 16 where it divides max_len): a strided view of the same storage,
  `key.as_strided((n, kv_heads, P, head_dim), (P * head_dim, max_len * head_dim, head_dim, 1))`. Page
  `b * kv_heads * (max_len // P) + c` is then positions [c * P, (c + 1) * P) of every head of sequence b, so
  sequence b's page list is that base plus arange(ceil(kv_len / P)) and the last page holds kv_len - (pages - 1) * P
  tokens. Same bytes, same kernel, but split-KV works as in a serving engine with P-token pages.

Kernel choice: with `use_tensor_cores` unset, group sizes above 4 use FlashInfer's tensor-core path (its FA2 prefill
kernel with one query row per sequence), as vLLM and SGLang do for bf16; smaller groups use the CUDA-core decode
kernel. The CUDA-core kernel only exists for groups 1, 2, 3, 4, 6, 8 and 16 (DISPATCH_GQA_GROUP_SIZE), so other
groups always take tensor cores. The backend is pinned to "fa2", so FlashInfer's "auto" routing (cuDNN, XQA) does
not apply.

Planning and running are separate: `FlashInferDecode.plan(kv_len)` runs on the host (it JIT-compiles the kernel on
first use, into $FLASHINFER_WORKSPACE_BASE/.cache/flashinfer, and computes the split schedule), once per kv_len;
`run` only launches kernels. The wrapper is built with `use_cuda_graph=True` and fixed index buffers, so `run` can be
captured in a CUDA graph after one eager warm-up call, and the graph replays correctly after a re-plan for another
kv_len with the same batch (FlashInfer's cudagraph mode writes the schedule into the same buffers).

flashinfer is imported lazily: importing this module never needs it, and `available()` says whether it can run.
"""

from __future__ import annotations

import functools
from typing import Any, Optional, Sequence, Union

import torch

DEFAULT_PAGE_SIZE = 16
WORKSPACE_BYTES = 128 * 1024 * 1024  # FlashInfer's recommended float workspace for split-KV partial results
CUDA_CORE_GROUPS = frozenset({1, 2, 3, 4, 6, 8, 16})  # group sizes FlashInfer's CUDA-core decode kernel is built for
TENSOR_CORE_ABOVE = 4  # groups above this use tensor cores by default (vLLM's and SGLang's rule for 16-bit caches)


@functools.lru_cache(maxsize=1)
def _flashinfer() -> Optional[Any]:
    """The flashinfer module, or None where it is not installed or fails to import."""
    try:
        import flashinfer  # noqa: F401
        import flashinfer.decode
    except Exception:  # an incomplete install can fail with more than ImportError
        return None
    return flashinfer


def available() -> bool:
    """Whether FlashInfer imports and there is a CUDA device to run it on."""
    return torch.cuda.is_available() and _flashinfer() is not None


def default_page_size(max_len: int) -> int:
    """DEFAULT_PAGE_SIZE where it divides max_len, else one page per sequence (page_size = max_len)."""
    return DEFAULT_PAGE_SIZE if max_len % DEFAULT_PAGE_SIZE == 0 else max_len


def page_table(kv_lens: Sequence[int], kv_heads: int, max_len: int, page_size: int
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """FlashInfer's CSR page table (indptr, indices, last_page_len), int32 on the host, for `paged_view` pages.

    Sequence b holding kv_lens[b] tokens owns ceil(kv_lens[b] / page_size) pages starting at page b (one page per
    sequence, page_size == max_len) or at b * kv_heads * (max_len // page_size) (smaller pages).
    """
    if page_size < 1 or max_len % page_size:
        raise ValueError(f"page_size {page_size} must divide max_len {max_len}")
    if not kv_lens or not all(1 <= int(n) <= max_len for n in kv_lens):
        raise ValueError(f"every kv_len must be in [1, {max_len}]: {list(kv_lens)}")
    seq_stride = 1 if page_size == max_len else kv_heads * (max_len // page_size)
    pages = [-(-int(n) // page_size) for n in kv_lens]
    indptr = torch.tensor([0] + pages, dtype=torch.int64).cumsum(0).to(torch.int32)
    indices = torch.cat([b * seq_stride + torch.arange(p, dtype=torch.int32) for b, p in enumerate(pages)])
    last = torch.tensor([int(n) - (p - 1) * page_size for n, p in zip(kv_lens, pages)], dtype=torch.int32)
    return indptr, indices, last


def paged_view(cache: torch.Tensor, page_size: int) -> torch.Tensor:
    """A static cache (batch, kv_heads, max_len, head_dim), contiguous, as HND pages (n, kv_heads, page_size,
    head_dim) sharing its storage: the cache itself for page_size == max_len, else the strided view of the module
    docstring, in which page b * kv_heads * (max_len // page_size) + c is positions [c * page_size, (c + 1) *
    page_size) of every KV head of sequence b."""
    batch, kv_heads, max_len, head_dim = cache.shape
    if page_size == max_len:
        return cache
    if max_len % page_size or not cache.is_contiguous():
        raise ValueError(f"need a contiguous cache and a page_size dividing {max_len}, got {page_size}")
    pages_per_seq = max_len // page_size
    slots = (batch - 1) * kv_heads * pages_per_seq + pages_per_seq
    return cache.as_strided((slots, kv_heads, page_size, head_dim),
                            (page_size * head_dim, max_len * head_dim, head_dim, 1), cache.storage_offset())


class FlashInferDecode:
    """FlashInfer batch decode for one fixed (batch, kv_heads, groups, head_dim, max_len) problem.

    Usage: `attn = FlashInferDecode(batch, kv_heads, groups, head_dim, max_len, scale)`, then
    `attn.plan(kv_len)` (host, not timed; again whenever kv_len changes) and `out = attn.run(q, key, value)`
    (timed; CUDA-graph-capturable after one eager call). See the module docstring for the layout.
    """

    def __init__(
        self,
        batch: int,
        kv_heads: int,
        groups: int,
        head_dim: int,
        max_len: int,
        scale: float,
        *,
        dtype: torch.dtype = torch.bfloat16,
        device: Union[str, torch.device] = "cuda",
        page_size: Optional[int] = None,
        use_tensor_cores: Optional[bool] = None,
        use_cuda_graph: bool = True,
    ) -> None:
        flashinfer = _flashinfer()
        if flashinfer is None:
            raise RuntimeError("flashinfer is not installed or does not import (pip install flashinfer-python)")
        page_size = default_page_size(max_len) if page_size is None else page_size
        if page_size < 1 or max_len % page_size != 0:
            raise ValueError(f"page_size {page_size} must divide max_len {max_len}")
        if use_tensor_cores is None:
            use_tensor_cores = groups > TENSOR_CORE_ABOVE or groups not in CUDA_CORE_GROUPS
        elif not use_tensor_cores and groups not in CUDA_CORE_GROUPS:
            raise ValueError(f"FlashInfer's CUDA-core decode kernel has no build for {groups} query heads per KV head")
        self.batch, self.kv_heads, self.groups, self.head_dim = batch, kv_heads, groups, head_dim
        self.max_len, self.scale, self.dtype = max_len, float(scale), dtype
        self.device = torch.device(device)
        self.page_size = page_size
        self.pages_per_seq = max_len // page_size
        self.use_tensor_cores = use_tensor_cores
        self.use_cuda_graph = use_cuda_graph
        self.kv_len: Optional[int] = None
        workspace = torch.zeros(WORKSPACE_BYTES, dtype=torch.uint8, device=self.device)
        buffers = {}
        if use_cuda_graph:
            buffers = dict(
                paged_kv_indptr_buffer=torch.zeros(batch + 1, dtype=torch.int32, device=self.device),
                paged_kv_indices_buffer=torch.zeros(batch * self.pages_per_seq, dtype=torch.int32, device=self.device),
                paged_kv_last_page_len_buffer=torch.zeros(batch, dtype=torch.int32, device=self.device),
            )
        self.wrapper = flashinfer.decode.BatchDecodeWithPagedKVCacheWrapper(
            workspace, "HND", use_cuda_graph=use_cuda_graph, use_tensor_cores=use_tensor_cores, backend="fa2",
            **buffers,
        )

    def page_table(self, kv_len: Union[int, Sequence[int]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(indptr, indices, last_page_len) on the host for this problem; see `page_table`."""
        lengths = [int(kv_len)] * self.batch if isinstance(kv_len, int) else [int(n) for n in kv_len]
        if len(lengths) != self.batch:
            raise ValueError(f"kv_len has {len(lengths)} entries for {self.batch} sequences")
        return page_table(lengths, self.kv_heads, self.max_len, self.page_size)

    def plan(self, kv_len: Union[int, Sequence[int]]) -> None:
        """Host-side planning for caches whose first kv_len positions are valid (an int, or one per sequence).

        The first call loads FlashInfer's kernel for this dtype and head_dim: a prebuilt (AOT) module where one is
        installed, else a JIT build cached under $FLASHINFER_WORKSPACE_BASE (minutes, once per machine).
        """
        indptr, indices, last = self.page_table(kv_len)
        self.wrapper.plan(
            indptr, indices, last, self.kv_heads * self.groups, self.kv_heads, self.head_dim, self.page_size,
            q_data_type=self.dtype, kv_data_type=self.dtype, o_data_type=self.dtype, sm_scale=self.scale,
            non_blocking=False,
        )
        self.kv_len = kv_len if isinstance(kv_len, int) else max(kv_len)

    def paged(self, cache: torch.Tensor) -> torch.Tensor:
        """The static cache (batch, kv_heads, max_len, head_dim) as FlashInfer HND pages; see `paged_view`."""
        return paged_view(cache, self.page_size)

    def run(self, q: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
            out: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Attention output (batch, kv_heads, groups, head_dim) for packed queries q (batch, kv_heads, groups, head_dim).

        key and value must be contiguous (batch, kv_heads, max_len, head_dim) tensors of the planned shape; `out`,
        if given, is a contiguous (batch, kv_heads, groups, head_dim) tensor written in place.
        """
        qo = q.reshape(self.batch, self.kv_heads * self.groups, self.head_dim)
        if out is None:
            out = torch.empty_like(q, memory_format=torch.contiguous_format)
        self.wrapper.run(qo, (self.paged(key), self.paged(value)), out=out.view(qo.shape))
        return out

    def check(self, q: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> None:
        """Raise ValueError unless q, key and value have the planned shapes, dtype, device and contiguity (untimed)."""
        cache_shape = (self.batch, self.kv_heads, self.max_len, self.head_dim)
        for name, tensor, shape in (("q", q, (self.batch, self.kv_heads, self.groups, self.head_dim)),
                                    ("key", key, cache_shape), ("value", value, cache_shape)):
            if tuple(tensor.shape) != shape or tensor.dtype != self.dtype or not tensor.is_contiguous():
                raise ValueError(f"{name}: expected a contiguous {self.dtype} tensor of shape {shape}, "
                                 f"got {tensor.dtype} {tuple(tensor.shape)} contiguous={tensor.is_contiguous()}")
            if tensor.device.type != "cuda":
                raise ValueError(f"{name} is on {tensor.device}, not a CUDA device")
        if self.kv_len is None:
            raise ValueError("plan(kv_len) has not been called")

