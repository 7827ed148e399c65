"""A quantized KV cache in gqa-eval: the quantizer, the attention that applies it, the bytes it counts, the report."""

import json
import math

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from gqa_uptrain.errors import ConfigError
from gqa_uptrain.eval.kv_quant import fake_quantize, quantize_kv, quantized_kv_attention
from gqa_uptrain.eval.options import EvalOptions
from gqa_uptrain.eval.perplexity import perplexity, tokenize_documents
from gqa_uptrain.kv_heads import KVQuantization, kv_cache_bytes_per_token


def test_values_on_the_grid_come_back_exactly():
    """Values that are already levels of their group's grid (min and max included) are stored without error."""
    torch.manual_seed(0)
    for nbits, step in ((4, 0.25), (8, 2.0**-6)):
        levels = torch.randint(0, 2**nbits, (2, 3, 5, 32))
        levels[..., 0], levels[..., 16], levels[..., 15], levels[..., 31] = 0, 0, 2**nbits - 1, 2**nbits - 1
        for dtype in (torch.float32, torch.bfloat16):
            states = (levels * step - 1.0).to(dtype)
            assert torch.equal(fake_quantize(states, nbits, 16), states)


def test_int8_error_is_far_below_int4_error():
    states = torch.randn(2, 4, 64, 64)
    error = {bits: (fake_quantize(states, bits, 64) - states).abs().mean().item() for bits in (8, 4)}
    assert 0 < error[8] < error[4] / 10


def test_each_group_has_its_own_range():
    """An outlier changes only its own group; a group holds at most 2^nbits distinct values."""
    states = torch.randn(1, 1, 4, 32)
    spiked = states.clone()
    spiked[0, 0, 1, 3] = 100.0
    before, after = fake_quantize(states, 4, 8), fake_quantize(spiked, 4, 8)
    changed = (before != after).reshape(4, 4, 8).any(-1)  # per token, per group of 8
    assert changed.tolist() == [[False] * 4, [True, False, False, False], [False] * 4, [False] * 4]
    assert all(len(group.unique()) <= 16 for group in before.reshape(-1, 8))
    constant = torch.full((1, 1, 2, 8), 0.3)
    assert torch.equal(fake_quantize(constant, 4, 8), constant)  # a zero range stores the value itself


def test_the_residual_window_stays_bit_identical():
    states = torch.randn(2, 2, 12, 16)
    quantized = quantize_kv(states, KVQuantization(4, group_size=16, residual_length=5))
    assert torch.equal(quantized[..., 7:, :], states[..., 7:, :])
    assert not torch.equal(quantized[..., :7, :], states[..., :7, :])
    assert torch.equal(quantized[..., :7, :], fake_quantize(states[..., :7, :], 4, 16))
    assert quantize_kv(states, KVQuantization(4, residual_length=12)) is states  # all in the window


def test_group_size_fits_the_head_size():
    assert KVQuantization(4, group_size=64).group(16) == 16  # longer than a vector: one group per vector
    assert KVQuantization(4, group_size=8).group(16) == 8
    with pytest.raises(ConfigError, match="^--kv-group-size 5 does not divide the head size 16: use a divisor of 16$"):
        KVQuantization(4, group_size=5).group(16)


def llama_2_7b(kv_heads: int) -> LlamaConfig:
    return LlamaConfig(hidden_size=4096, num_attention_heads=32, num_key_value_heads=kv_heads, num_hidden_layers=32,
                       intermediate_size=11008, dtype="float16")


def test_bytes_per_token_count_the_quantized_storage():
    """Llama-2-7B: 512 KiB a token in fp16; int4 stores 64 bytes per 128-element vector plus two fp16 groups of
    scale and zero-point (72 bytes), int8 128 + 8; GQA-8 divides each by four."""
    mha, gqa8 = llama_2_7b(32), llama_2_7b(8)
    assert kv_cache_bytes_per_token(mha) == 2 * 32 * 32 * 128 * 2 == 524288
    assert kv_cache_bytes_per_token(mha, quant=KVQuantization(4)) == 2 * 32 * 32 * 72 == 147456
    assert kv_cache_bytes_per_token(mha, quant=KVQuantization(8)) == 2 * 32 * 32 * 136
    assert kv_cache_bytes_per_token(gqa8, quant=KVQuantization(4)) == 2 * 32 * 8 * 72 == 36864
    assert kv_cache_bytes_per_token(gqa8, quant=KVQuantization(4, group_size=128)) == 2 * 32 * 8 * (64 + 4)
    assert kv_cache_bytes_per_token(mha, "bfloat16", KVQuantization(4, residual_length=0)) == 147456


@pytest.fixture(scope="module")
def model(tiny_llama):
    return AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def documents(gpt2_tokenizer, held_out_text):
    return tokenize_documents([held_out_text.read_text()], gpt2_tokenizer, max_tokens=120)


def scored(model, documents, quant):
    with quantized_kv_attention(model, quant):
        return perplexity(model, documents, window=48, stride=24, batch_size=4)


def test_no_quantization_changes_nothing(model, documents):
    plain = perplexity(model, documents, window=48, stride=24, batch_size=4)
    assert scored(model, documents, None) == plain
    assert scored(model, documents, KVQuantization(4, residual_length=48)) == plain  # all in the window


def test_the_share_of_quantized_positions_is_counted(model, documents):
    with quantized_kv_attention(model, KVQuantization(4, residual_length=8)) as share:
        perplexity(model, documents, window=48, stride=48, batch_size=4)
    assert share.value == pytest.approx(40 / 48, abs=0.1)  # windows of 48 (the last may be shorter), 8 kept
    with quantized_kv_attention(model, KVQuantization(4, residual_length=48)) as share:
        perplexity(model, documents, window=48, stride=48, batch_size=4)
    assert share.value == 0


def test_a_cache_that_quantized_nothing_is_said_in_one_line(gqa_eval, eval_args, tiny_llama, held_out_text, tmp_path,
                                                            capsys):
    """The default window (128 positions in full precision) holds every 32-token window: the int4 row is the
    unquantized one, and the user is told so instead of reading a 4x smaller cache at no cost."""
    output = tmp_path / "report"
    args = eval_args(tiny_llama, [], output, tmp_path / "cache", "--perplexity", str(held_out_text),
                     "--perplexity-window", "32", "--perplexity-stride", "32", "--kv-cache", "none", "int4")
    assert gqa_eval(args) == 0
    err = capsys.readouterr().err
    said = [line for line in err.splitlines() if "quantized nothing" in line]
    assert len(said) == 1 and said[0].startswith("gqa-eval: warning: ") and "--kv-residual 0" in said[0]
    report = json.loads((output / "report.json").read_text())
    assert report["candidates"][0]["kv_quantized_share"] == 0
    assert "int4 (0% quantized)" in (output / "report.md").read_text()


def test_int4_moves_perplexity_more_than_int8(model, documents):
    plain = perplexity(model, documents, window=48, stride=24, batch_size=4)["nll_per_token"]
    nll = {bits: scored(model, documents, KVQuantization(bits, residual_length=0))["nll_per_token"] for bits in (8, 4)}
    assert all(math.isfinite(value) for value in nll.values())
    assert 0 < abs(nll[8] - plain) < abs(nll[4] - plain)
    assert model.config._attn_implementation == "sdpa"  # the model's own attention is back


def test_eager_attention_is_wrapped_too(tiny_llama, documents):
    eager = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32, attn_implementation="eager").eval()
    sdpa = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()
    quant = KVQuantization(4, residual_length=8)
    assert scored(eager, documents, quant)["nll_per_token"] == pytest.approx(
        scored(sdpa, documents, quant)["nll_per_token"], rel=1e-5)
    assert eager.config._attn_implementation == "eager"


def test_the_attention_is_restored_after_an_error(model):
    with pytest.raises(RuntimeError), quantized_kv_attention(model, KVQuantization(4)):
        raise RuntimeError("boom")
    assert model.config._attn_implementation == "sdpa"


@pytest.mark.parametrize("field,value,message", [
    ("kv_cache", ["int3"], "--kv-cache: Input should be 'none', 'int8' or 'int4' (got 'int3')"),
    ("kv_cache", ["int4", "int4"], "--kv-cache names a cache twice: int4 int4"),
    ("kv_group_size", 0, "--kv-group-size must be at least 1, got 0"),
    ("kv_residual", -1, "--kv-residual must be at least 0, got -1"),
])
def test_bad_kv_options_are_one_line(field, value, message):
    with pytest.raises(ConfigError) as error:
        EvalOptions(base="base", models=[], output="out", tasks="gqa_lastword", **{field: value})
    assert str(error.value) == message


def test_cli_refuses_a_bad_cache_in_one_line(gqa_eval, eval_args, tiny_llama, tmp_path, capsys):
    args = eval_args(tiny_llama, [], tmp_path / "out", tmp_path / "cache", "--tasks", "gqa_lastword",
                     "--kv-cache", "int3")
    assert gqa_eval(args) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "gqa-eval: error: --kv-cache: Input should be 'none', 'int8' or 'int4' (got 'int3')"]
    args = eval_args(tiny_llama, [], tmp_path / "out", tmp_path / "cache", "--tasks", "gqa_lastword",
                     "--kv-cache", "int4", "--kv-group-size", "5")
    assert gqa_eval(args) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "gqa-eval: error: --kv-group-size 5 does not divide the head size 16: use a divisor of 16")


@pytest.mark.slow
def test_report_holds_every_model_with_every_cache(gqa_eval, eval_args, tiny_llama, tiny_llama_gqa2, held_out_text,
                                                   tmp_path):
    output = tmp_path / "report"
    args = eval_args(tiny_llama, [tiny_llama_gqa2], output, tmp_path / "cache", "--tasks", "gqa_lastword",
                     "--perplexity", str(held_out_text), "--perplexity-window", "32", "--perplexity-stride", "16",
                     "--kv-cache", "none", "int4", "--kv-residual", "4")
    assert gqa_eval(args) == 0
    report = json.loads((output / "report.json").read_text())
    records = [report["base"], *report["candidates"]]
    base, gqa = tiny_llama.name, tiny_llama_gqa2.name
    assert [(r["label"], r["kv_cache"]) for r in records] == [
        (base, "none"), (f"{base} (int4 KV)", "int4"), (gqa, "none"), (f"{gqa} (int4 KV)", "int4")]
    assert [r["kv_cache_bytes_per_token"] for r in records] == [
        2 * 2 * 4 * 16 * 4, 2 * 2 * 4 * (8 + 2 * 4), 2 * 2 * 2 * 16 * 4, 2 * 2 * 2 * (8 + 2 * 4)]
    ppl = [r["perplexity"]["token_perplexity"] for r in records]
    assert all(math.isfinite(p) for p in ppl) and ppl[1] != ppl[0] and ppl[3] != ppl[2]
    assert set(report["comparisons"]) == {r["label"] for r in records[1:]}
    assert report["settings"]["kv_cache"] == {"caches": ["none", "int4"], "group_size": 64, "residual_length": 4}
    markdown = (output / "report.md").read_text()
    assert records[1]["kv_quantized_share"] > 0.5  # windows of 32, the last 4 positions kept: most is quantized
    assert f"| {base} (int4 KV) | 4 | int4 ({records[1]['kv_quantized_share']:.0%} quantized) | 256 B | 0.250 |" \
        in markdown
    assert f"## {gqa} (int4 KV) vs base" in markdown and "KV caches: none, int4" in markdown
    assert (output / "quality_vs_kv_cache.png").is_file()
