"""Engine-style decode computes what stock generate() computes; the floor is the byte count over the bandwidth.

No test here is timed: speed is measured by scripts/bench_decode.py. On a machine with a GPU the engine tests also
run there, through the CUDA graph (and torch.compile).
"""

import os
import subprocess
import sys
import textwrap

import pytest
import torch
from transformers import LlamaForCausalLM
from transformers.integrations.sdpa_attention import repeat_kv

from gqa_uptrain.errors import ConfigError, UnsupportedModelError
from gqa_uptrain.kv_heads import kv_cache_bytes
from gqa_uptrain.eval.decode_engine import WARMUP_STEPS, StaticDecoder, engine
from gqa_uptrain.eval.packed_attention import (attention_implementation, packed_gqa_attention, packed_gqa_sdpa,
                                               packed_gqa_split_kv)
from gqa_uptrain.eval.projection_fusion import fused_projections
from gqa_uptrain.eval.speed import decode_floor_seconds, measure_bandwidth, measure_decode, weight_bytes_per_step
from tiny_models import ARCHITECTURES, VOCAB, random_model, small_llama

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
# (device, cuda_graph, compile, split_kv): CPU runs the step itself (split_kv falls back to SDPA there); a GPU
# replays it from a CUDA graph, compiled or not, with either decode attention.
ENGINES = [("cpu", False, False, False), ("cpu", False, False, True)] + (
    [("cuda", True, compile, split_kv) for compile in (False, True) for split_kv in (False, True)]
    if torch.cuda.is_available() else [])


def tiny_llama(kv_heads: int, tie: bool = False) -> LlamaForCausalLM:
    return small_llama(kv_heads, layers=2, seed=kv_heads, hidden_size=64, intermediate_size=96,
                       max_position_embeddings=128, tie_word_embeddings=tie, pad_token_id=0, eos_token_id=2).eval()


def prompt(batch: int = 3, length: int = 11) -> torch.Tensor:
    return torch.randint(3, VOCAB, (batch, length), generator=torch.Generator().manual_seed(batch * length))


def engine_generate(model, input_ids: torch.Tensor, new_tokens: int, *, cuda_graph: bool | None = None,
                    compile: bool = False, split_kv: bool = False, fuse: bool = False) -> torch.Tensor:
    """Greedy continuation of `input_ids` by the engine's `StaticDecoder`, prompt plus `new_tokens` tokens, as
    `generate()` returns it: the oracle that the engine decodes what stock generate() does."""
    with engine(model, input_ids, split_kv, fuse):
        decoder = StaticDecoder(model, input_ids, new_tokens, cuda_graph=cuda_graph, compile=compile)
        if new_tokens > 1:
            decoder.warm_up(min(WARMUP_STEPS, new_tokens - 1))
        while decoder.produced < new_tokens:
            decoder.step()
    return decoder.tokens


def stock_greedy(model, input_ids: torch.Tensor, new_tokens: int) -> torch.Tensor:
    """Stock greedy decoding, past any end-of-sequence token as the engine decodes."""
    return model.generate(input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=new_tokens,
                          do_sample=False, eos_token_id=None, pad_token_id=0)


@pytest.mark.parametrize("device,cuda_graph,compile,split_kv", ENGINES)
@pytest.mark.parametrize("kv_heads", [4, 2, 1], ids=["mha", "gqa2", "mqa"])
def test_engine_decode_gives_the_greedy_tokens_of_generate(kv_heads, device, cuda_graph, compile, split_kv):
    model = tiny_llama(kv_heads).to(device)
    input_ids = prompt().to(device)
    expected = stock_greedy(model, input_ids, 8)
    got = engine_generate(model, input_ids, 8, cuda_graph=cuda_graph, compile=compile, split_kv=split_kv)
    assert torch.equal(got, expected)
    assert attention_implementation(model) == "sdpa"  # the model's own attention is back


@pytest.mark.parametrize("model_type", [t for t in ARCHITECTURES if t != "gemma2"])
def test_engine_decode_runs_every_covered_architecture(model_type):
    model = random_model(model_type, kv_heads=2)
    input_ids = prompt(2, 12)
    expected = stock_greedy(model, input_ids, 5)
    assert torch.equal(engine_generate(model, input_ids, 5), expected)
    assert torch.equal(engine_generate(model, input_ids, 5, fuse=True), expected)


@pytest.mark.parametrize("device,cuda_graph,compile,split_kv", ENGINES)
def test_fused_projections_decode_the_same_tokens_and_give_the_model_back(device, cuda_graph, compile, split_kv):
    model = tiny_llama(2).to(device)
    before = {name: p.clone() for name, p in model.named_parameters()}
    input_ids = prompt().to(device)
    expected = stock_greedy(model, input_ids, 8)
    got = engine_generate(model, input_ids, 8, cuda_graph=cuda_graph, compile=compile, split_kv=split_kv, fuse=True)
    assert torch.equal(got, expected)
    assert all(torch.equal(p, before[name]) for name, p in model.named_parameters())
    assert [type(model.model.layers[0].self_attn.q_proj), type(model.model.layers[0].mlp.up_proj)] == [
        torch.nn.Linear, torch.nn.Linear]


def test_fused_projections_fuse_each_layer_s_two_groups():
    model = tiny_llama(2)
    with fused_projections(model) as fused:
        attention = model.model.layers[0].self_attn
        assert fused == 2 * model.config.num_hidden_layers
        assert type(attention.q_proj).__name__ == "_FusedPart"


def test_fused_projections_refuse_a_block_that_calls_them_in_another_order(monkeypatch):
    model = tiny_llama(2)
    attention_type = type(model.model.layers[0].self_attn)
    original = attention_type.forward

    def value_first(self, hidden_states, *args, **kwargs):
        self.v_proj(hidden_states)
        return original(self, hidden_states, *args, **kwargs)

    monkeypatch.setattr(attention_type, "forward", value_first)
    with pytest.raises(UnsupportedModelError, match="cannot fuse"), fused_projections(model, probe=prompt(1, 5)):
        pass
    assert type(model.model.layers[0].self_attn.q_proj) is torch.nn.Linear


def test_soft_capped_attention_is_refused_in_one_line():
    model = random_model("gemma2", kv_heads=2)
    with pytest.raises(UnsupportedModelError, match="needs SDPA attention"):
        engine_generate(model, prompt(2, 12), 4)
    assert attention_implementation(model) != "packed_gqa_sdpa"


REGISTRATION = """
from transformers import AttentionInterface
from gqa_uptrain.eval import decode_engine, packed_attention, projection_fusion, speed
print("packed_gqa_sdpa" in AttentionInterface(), end=" ")
packed_attention.register_attention()
print("packed_gqa_sdpa" in AttentionInterface() and "packed_gqa_split_kv" in AttentionInterface())
"""


@pytest.mark.slow
def test_attention_is_registered_by_the_engine_not_by_an_import():
    run = subprocess.run([sys.executable, "-c", textwrap.dedent(REGISTRATION)], capture_output=True, text=True,
                         timeout=300)
    assert run.stdout.split() == ["False", "True"], run.stderr[-3000:]


# (device, dtype): the GPU runs the split-KV Triton kernel, in float32 and bfloat16.
ATTENTION_CASES = [("cpu", torch.float32)] + (
    [("cuda", torch.float32), ("cuda", torch.bfloat16)] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("attention", [packed_gqa_sdpa, packed_gqa_split_kv], ids=["sdpa", "split_kv"])
@pytest.mark.parametrize("device,dtype", ATTENTION_CASES)
@pytest.mark.parametrize("kv_heads", [8, 2, 1])
@pytest.mark.parametrize("per_head_mask", [False, True])
@pytest.mark.parametrize("length,dim", [(37, 16), (1500, 80)])  # the long cache is split; 80 is no power of 2
def test_packed_attention_equals_attention_over_repeated_heads(
    attention, device, dtype, kv_heads, per_head_mask, length, dim
):
    """One query token against a padded cache: the packed call equals SDPA over K/V repeated to every query head."""
    generator = torch.Generator().manual_seed(kv_heads)
    batch, heads = 2, 8
    query = torch.randn(batch, heads, 1, dim, generator=generator).to(device, dtype)
    key, value = (torch.randn(batch, kv_heads, length, dim, generator=generator).to(device, dtype) for _ in range(2))
    mask = torch.rand(batch, heads if per_head_mask else 1, 1, length, generator=generator).to(device) > 0.3
    mask[..., -length // 3:] = False  # the unwritten tail of a static cache
    groups = heads // kv_heads
    expected = torch.nn.functional.scaled_dot_product_attention(
        *(t.double() for t in (query, repeat_kv(key, groups), repeat_kv(value, groups))), attn_mask=mask, scale=0.3
    ).transpose(1, 2)
    got, _ = attention(None, query, key, value, mask, scaling=0.3)
    assert got.dtype == dtype
    tolerance = {"atol": 1e-5, "rtol": 1e-4} if dtype == torch.float32 else {"atol": 1e-2, "rtol": 2e-2}
    torch.testing.assert_close(got.double(), expected, **tolerance)


def test_prefill_logits_match_a_plain_forward():
    """The engine's prefill (static cache, enable_gqa) gives the logits of the stock model without a cache."""
    model, input_ids = tiny_llama(2), prompt()
    with torch.no_grad():
        expected = model(input_ids).logits[:, -1]
        with packed_gqa_attention(model):
            decoder = StaticDecoder(model, input_ids, 4)
    assert torch.equal(decoder.tokens[:, input_ids.shape[1]], expected.argmax(-1))


def test_attention_is_restored_after_an_error():
    model = tiny_llama(2)
    with pytest.raises(RuntimeError), packed_gqa_attention(model):
        assert attention_implementation(model) == "packed_gqa_sdpa"
        raise RuntimeError("boom")
    assert attention_implementation(model) == "sdpa"


def test_the_static_cache_refuses_tokens_past_its_size():
    model = tiny_llama(2)
    with packed_gqa_attention(model):
        decoder = StaticDecoder(model, prompt(), 3)
        decoder.warm_up(1)
        decoder.step()
        with pytest.raises(ConfigError, match="holds 3 new tokens"):
            decoder.step()


@pytest.mark.parametrize("tie", [False, True])
def test_weight_bytes_leave_out_an_untied_input_embedding(tie):
    model = tiny_llama(2, tie=tie)
    everything = sum(p.numel() * 4 for p in model.parameters())
    embedding = VOCAB * 64 * 4
    assert weight_bytes_per_step(model) == (everything if tie else everything - embedding)


def test_decode_figures_follow_from_the_measured_times_and_the_byte_count():
    model = tiny_llama(2)
    rows = measure_decode(model, [1, 2], [16], new_tokens=4, bandwidth=1e9, progress=False)
    assert [(r["batch"], r["context"]) for r in rows] == [(1, 16), (2, 16)]
    for row in rows:
        step_bytes = weight_bytes_per_step(model) + kv_cache_bytes(model.config, 18, row["batch"])
        assert row["floor_tokens_per_s"] == pytest.approx(row["batch"] * 1e9 / step_bytes)
        assert row["fraction_of_floor"] == pytest.approx(row["tokens_per_s"] / row["floor_tokens_per_s"])
        assert row["generate_fraction_of_floor"] == pytest.approx(
            row["generate_tokens_per_s"] / row["floor_tokens_per_s"])
        assert row["tokens_per_s"] > 0 and row["generate_tokens_per_s"] > 0
        assert row["kv_cache_bytes_per_token"] == 2 * 2 * 2 * 16 * 4  # K and V, 2 layers, 2 KV heads of 16, fp32
    assert attention_implementation(model) == "sdpa"


def test_the_floor_shrinks_with_the_kv_heads_by_the_cache_bytes_alone():
    mha, gqa = tiny_llama(4), tiny_llama(1)
    context, batch = 100, 4
    saved_cache = kv_cache_bytes(mha.config, context, batch) - kv_cache_bytes(gqa.config, context, batch)
    saved_weights = weight_bytes_per_step(mha) - weight_bytes_per_step(gqa)  # the smaller k_proj and v_proj
    gap = decode_floor_seconds(mha, batch, context, 1.0) - decode_floor_seconds(gqa, batch, context, 1.0)
    assert gap == saved_cache + saved_weights
    assert saved_cache == batch * context * 2 * 2 * 3 * 16 * 4


@pytest.mark.parametrize("sizes", [([0], [16], 4), ([1], [], 4), ([1], [16], 1), ([1.5], [16], 4)])
def test_bad_sizes_are_refused(sizes):
    batches, contexts, new_tokens = sizes
    with pytest.raises(ConfigError):
        measure_decode(tiny_llama(2), batches, contexts, new_tokens, bandwidth=1e9, progress=False)


def test_bandwidth_counts_bytes_read_and_written():
    assert 1e8 < measure_bandwidth("cpu", nbytes=1 << 24, repeats=3) < 1e13


SPLIT_KV_IN_INTERPRETER = """
import torch
from gqa_uptrain.eval import decode_kernels
decode_kernels._multiprocessors = lambda index: 4  # the interpreter has no device to ask
for kv_heads, groups, length, dim in [(2, 4, 700, 64), (1, 8, 777, 80), (4, 1, 130, 128), (2, 2, 40, 16)]:
    generator = torch.Generator().manual_seed(length)
    query = torch.randn(2, kv_heads, groups, dim, generator=generator)
    key, value = (torch.randn(2, kv_heads, length, dim, generator=generator) for _ in range(2))
    mask = (torch.rand(2, 1, 1, length, generator=generator) > 0.3).expand(2, 1, 1, length).clone()
    mask[..., -length // 4:] = False
    for m in (mask, None):
        got = decode_kernels.split_kv_decode(query, key, value, m, 0.2)
        expected = torch.nn.functional.scaled_dot_product_attention(query, key, value, attn_mask=m, scale=0.2)
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)
print("ok")
"""


def test_split_kv_kernels_in_the_triton_interpreter():
    """The Triton kernels' arithmetic (splits, online softmax, merge, mask, padded head size) on the CPU."""
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    run = subprocess.run([sys.executable, "-c", textwrap.dedent(SPLIT_KV_IN_INTERPRETER)], env=env,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and run.stdout.strip().endswith("ok"), run.stderr[-3000:]


def test_decoding_passes_the_cache_under_its_current_name(monkeypatch):
    """No `past_key_values` FutureWarning (or deprecation log line) from the engine, generate() or the KV-cache count."""
    import warnings

    from transformers.utils import generic

    from gqa_uptrain.eval.kv_cache import measured_kv_cache_bytes_per_token

    logged = []
    monkeypatch.setattr(generic.logger, "warning_once", lambda *args, **kwargs: logged.append(args))
    model = tiny_llama(2)
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        measure_decode(model, [1], [8], 3, bandwidth=1e10, progress=False)
        measured_kv_cache_bytes_per_token(model, prompt(1, 5))
    assert not [args for args in logged if "past_key_values" in str(args)]


@pytest.mark.parametrize("name,kind", [
    ("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize64x64x64", "matmul"),
    ("nvjet_tst_64x8_64x16_4x1_v_bz_TNT", "matmul"),
    ("_split_kernel", "attention"),
    ("_merge_kernel", "attention"),
    ("pytorch_flash::flash_fwd_splitkv_kernel<Flash_fwd_kernel_traits<128>>", "attention"),
    ("BatchDecodeWithPagedKVCacheKernel<...>", "attention"),
    ("triton_poi_fused__to_copy_add_mean_mul_pow_rsqrt_0", "other"),
    ("Memcpy DtoD (Device -> Device)", "other"),
])
def test_kernels_are_classed_by_name_as_the_breakdown_reports_them(name, kind):
    from gqa_uptrain.eval.speed import kernel_class

    assert kernel_class(name) == kind
