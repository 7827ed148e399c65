"""Exact properties of a conversion, on every covered architecture (tiny random fp32 models, CPU)."""

from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from gqa_uptrain.convert import convert_checkpoint
from tiny_models import ARCHITECTURES, logits, random_model, repeat_kv_heads

ARCHS = sorted(ARCHITECTURES)


def save(model, path: Path) -> Path:
    model.save_pretrained(path)
    return path


def convert(source: Path, groups: int, tmp_path: Path, method: str = "mean") -> Path:
    return convert_checkpoint(source, groups, tmp_path / f"out-{method}-{groups}", method=method, progress=False)


@pytest.mark.parametrize("arch", ARCHS)
def test_same_head_count_changes_nothing(arch, tmp_path, tokens):
    source = save(random_model(arch, kv_heads=4), tmp_path / "src")
    out = convert(source, 4, tmp_path)
    assert torch.equal(logits(out, tokens), logits(source, tokens))
    with safe_open(source / "model.safetensors", "pt") as a, safe_open(out / "model.safetensors", "pt") as b:
        assert set(a.keys()) == set(b.keys())
        assert all(torch.equal(a.get_tensor(k), b.get_tensor(k)) for k in a.keys())


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize(("kv_heads", "groups"), [(4, 2), (4, 1), (2, 1)])
def test_identical_heads_pool_without_loss(arch, kv_heads, groups, tmp_path, tokens):
    """MHA -> GQA, MHA -> MQA and GQA -> coarser GQA, on a model whose heads repeat within each group."""
    small = random_model(arch, kv_heads=groups, seed=1)
    big = repeat_kv_heads(small, kv_heads)
    expected = logits(small, tokens)
    assert torch.allclose(logits(big, tokens), expected, atol=1e-5), "the test oracle is wrong"
    source = save(big, tmp_path / "src")
    for method in ("mean", "first"):
        out = convert(source, groups, tmp_path, method)
        model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
        assert model.config.num_key_value_heads == groups
        assert torch.allclose(logits(model, tokens), expected, atol=1e-4), method


@pytest.mark.parametrize("arch", ARCHS)
def test_random_method_keeps_shapes_and_runs(arch, tmp_path, tokens):
    """The checkpoint has a native 2-KV-head model's tensors and shapes; K/V projections are drawn afresh from
    N(0, initializer_range), K/V biases start at zero, norms are mean-pooled, the rest is copied; the model runs."""
    source = save(random_model(arch, kv_heads=4), tmp_path / "src")
    native = save(random_model(arch, kv_heads=2), tmp_path / "native")
    out, mean = convert(source, 2, tmp_path, "random"), convert(source, 2, tmp_path, "mean")
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert model.config.num_key_value_heads == 2
    assert torch.isfinite(logits(model, tokens)).all()
    std = getattr(model.config, "initializer_range", 0.02)
    files = (safe_open(path / "model.safetensors", "pt") for path in (source, native, out, mean))
    with next(files) as src, next(files) as nat, next(files) as got, next(files) as pooled:
        assert {k: got.get_slice(k).get_shape() for k in got.keys()} == {
            k: nat.get_slice(k).get_shape() for k in nat.keys()}
        for name in got.keys():
            tensor = got.get_tensor(name)
            if "norm" in name:  # norms have no random initialisation: pooled as `mean` pools them
                assert torch.equal(tensor, pooled.get_tensor(name)), name
                continue
            before = src.get_tensor(name) if name in src.keys() else None
            if before is not None and before.shape == tensor.shape:  # no KV-head axis: copied
                assert torch.equal(tensor, before), name
                continue
            if "qkv" in name:  # fused [q | k | v]: the query rows are kept
                rows = model.config.num_attention_heads * model.config.head_dim
                assert torch.equal(tensor[:rows], before[:rows]), name
                tensor = tensor[rows:]
            if name.endswith("bias"):
                assert not tensor.any(), name
            else:
                assert tensor.std().item() == pytest.approx(std, rel=0.1), name
                assert abs(tensor.mean().item()) < 0.1 * std, name
                assert not {tuple(row) for row in tensor.tolist()} & {tuple(row) for row in before.tolist()}, name


@pytest.mark.parametrize("arch", ARCHS)
def test_kv_cache_shrinks_by_groups_over_heads(arch, tmp_path, tokens):
    source = save(random_model(arch, kv_heads=4), tmp_path / "src")
    out = convert(source, 1, tmp_path)
    before, after = (_generated_cache_bytes(path, tokens) for path in (source, out))
    assert after * 4 == before


def _generated_cache_bytes(path: Path, tokens: torch.Tensor) -> int:
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    result = model.generate(tokens, max_new_tokens=3, do_sample=False, return_dict_in_generate=True,
                            pad_token_id=0)
    cache = result.past_key_values
    return sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))
