"""The FlashInfer adapter: it imports without flashinfer, its page table reads exactly the valid cache positions, and
on a CUDA machine with flashinfer it matches a float32 reference attention."""

import math

import pytest
import torch

from gqa_uptrain.eval import flashinfer_attention as fa


def test_the_module_imports_and_says_whether_it_can_run():
    assert isinstance(fa.available(), bool)
    if not torch.cuda.is_available():
        assert fa.available() is False


def test_without_flashinfer_the_decoder_says_how_to_install_it(monkeypatch):
    monkeypatch.setattr(fa, "_flashinfer", lambda: None)
    assert fa.available() is False
    with pytest.raises(RuntimeError, match=r"pip install flashinfer-python"):
        fa.FlashInferDecode(1, 1, 1, 64, 64, 0.125)


def gather(cache: torch.Tensor, kv_lens: list[int], page_size: int) -> list[torch.Tensor]:
    """What FlashInfer reads for each sequence: (kv_heads, kv_len, head_dim), walking the page table as its kernels do."""
    batch, kv_heads, max_len, _ = cache.shape
    pages = fa.paged_view(cache, page_size)
    indptr, indices, last = fa.page_table(kv_lens, kv_heads, max_len, page_size)
    assert indptr.dtype == indices.dtype == last.dtype == torch.int32
    out = []
    for b in range(batch):
        ids = indices[indptr[b]:indptr[b + 1]].tolist()
        assert 1 <= last[b] <= page_size
        rows = [pages[i] for i in ids[:-1]] + [pages[ids[-1], :, : last[b]]]
        out.append(torch.cat(rows, dim=1))
    return out


@pytest.mark.parametrize("page_size", [1, 16, 48, 96])
def test_the_pages_are_the_valid_cache_positions_without_a_copy(page_size):
    batch, kv_heads, max_len, head_dim = 3, 2, 96, 4
    cache = torch.arange(batch * kv_heads * max_len * head_dim, dtype=torch.float32)
    cache = cache.view(batch, kv_heads, max_len, head_dim)
    assert fa.paged_view(cache, page_size).data_ptr() == cache.data_ptr()
    for kv_lens in ([37, 37, 37], [1, 96, 50]):
        for b, seen in enumerate(gather(cache, kv_lens, page_size)):
            assert torch.equal(seen, cache[b, :, : kv_lens[b]])


def test_one_page_per_sequence_is_the_cache_itself():
    cache = torch.zeros(2, 3, 40, 8)
    assert fa.paged_view(cache, 40) is cache
    indptr, indices, last = fa.page_table([17, 17], 3, 40, 40)
    assert indptr.tolist() == [0, 1, 2] and indices.tolist() == [0, 1] and last.tolist() == [17, 17]


def test_bad_page_sizes_and_lengths_are_refused():
    with pytest.raises(ValueError):
        fa.page_table([5], 1, 96, 40)
    with pytest.raises(ValueError):
        fa.page_table([97], 1, 96, 16)
    with pytest.raises(ValueError):
        fa.paged_view(torch.zeros(2, 2, 96, 4).transpose(1, 2).contiguous().transpose(1, 2), 16)


def reference(q, key, value, kv_len, scale):
    """Float32 attention of packed queries (B, H_kv, G, D) over the first kv_len cache positions."""
    k = key[:, :, :kv_len].float()
    v = value[:, :, :kv_len].float()
    scores = torch.einsum("bhgd,bhsd->bhgs", q.float(), k) * scale
    return torch.einsum("bhgs,bhsd->bhgd", scores.softmax(-1), v)


needs_flashinfer = pytest.mark.skipif(not fa.available(), reason="needs CUDA and flashinfer")


@needs_flashinfer
@pytest.mark.parametrize("groups", [1, 4, 32])
@pytest.mark.parametrize("page_size", [None, "max_len"])
def test_flashinfer_matches_reference_attention(groups, page_size):
    torch.manual_seed(groups)
    batch, kv_heads, head_dim, max_len = 3, 2, 128, 1024
    scale = 1 / math.sqrt(head_dim)
    device, dtype = "cuda", torch.bfloat16
    key = torch.randn(batch, kv_heads, max_len, head_dim, device=device, dtype=dtype)
    value = torch.randn_like(key)
    attn = fa.FlashInferDecode(batch, kv_heads, groups, head_dim, max_len, scale,
                               page_size=max_len if page_size == "max_len" else None)
    for kv_len in (1, 77, 1000):  # not multiples of the page size
        q = torch.randn(batch, kv_heads, groups, head_dim, device=device, dtype=dtype)
        attn.plan(kv_len)
        attn.check(q, key, value)
        out = attn.run(q, key, value)
        assert out.shape == q.shape and out.dtype == dtype
        torch.testing.assert_close(out.float(), reference(q, key, value, kv_len, scale), atol=2e-2, rtol=2e-2)


@needs_flashinfer
@pytest.mark.parametrize("groups", [4, 8])  # the CUDA-core kernel and the tensor-core one
def test_flashinfer_replays_in_a_cuda_graph_after_a_re_plan(groups):
    batch, kv_heads, head_dim, max_len = 2, 4, 128, 2048
    scale = 1 / math.sqrt(head_dim)
    key = torch.randn(batch, kv_heads, max_len, head_dim, device="cuda", dtype=torch.bfloat16)
    value = torch.randn_like(key)
    q = torch.randn(batch, kv_heads, groups, head_dim, device="cuda", dtype=torch.bfloat16)
    out = torch.empty_like(q)
    attn = fa.FlashInferDecode(batch, kv_heads, groups, head_dim, max_len, scale)
    attn.plan(1500)
    attn.run(q, key, value, out=out)  # warm-up outside the graph
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        attn.run(q, key, value, out=out)
    for kv_len in (1500, 333):
        attn.plan(kv_len)
        graph.replay()
        torch.cuda.synchronize()
        torch.testing.assert_close(out.float(), reference(q, key, value, kv_len, scale), atol=2e-2, rtol=2e-2)

