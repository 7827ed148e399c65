"""Exact properties of a conversion, on every covered architecture (tiny random fp32 models, CPU)."""

import json
import re
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoConfig, AutoModelForCausalLM

from gqa_uptrain.convert import convert_checkpoint
from gqa_uptrain.errors import UnsupportedModelError
from gqa_uptrain.kv_heads import text_config
from tiny_models import (ARCHITECTURES, HYBRID, MULTIMODAL, load, logits, random_model, repeat_kv_heads,
                         split_fused_qkv)

ARCHS = sorted(ARCHITECTURES) + sorted(MULTIMODAL) + sorted(HYBRID)


def save(model, path: Path) -> Path:
    model.save_pretrained(path)
    return path


def convert(source: Path, groups: int, tmp_path: Path, method: str = "mean") -> Path:
    out = tmp_path / f"out-{method}-{groups}"
    return convert_checkpoint(source, groups, out, method=method, progress=False).output


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
        model = load(out)
        assert text_config(model.config).num_key_value_heads == groups
        assert torch.allclose(logits(model, tokens), expected, atol=1e-4), method


@pytest.mark.parametrize("arch", ARCHS)
def test_random_method_keeps_shapes_and_runs(arch, tmp_path, tokens):
    """The checkpoint has a native 2-KV-head model's tensors and shapes; K/V projections are drawn afresh from
    N(0, initializer_range), K/V biases start at zero, norms are mean-pooled, the rest is copied; the model runs."""
    source = save(random_model(arch, kv_heads=4), tmp_path / "src")
    native = save(random_model(arch, kv_heads=2), tmp_path / "native")
    out, mean = convert(source, 2, tmp_path, "random"), convert(source, 2, tmp_path, "mean")
    model = load(out)
    assert text_config(model.config).num_key_value_heads == 2
    assert torch.isfinite(logits(model, tokens)).all()
    std = getattr(text_config(model.config), "initializer_range", 0.02)
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
            fused = split_fused_qkv(name, tensor, kv_heads=2)
            if fused is not None:  # fused q/k/v: the query rows are kept
                queries, tensor = fused
                assert torch.equal(queries, split_fused_qkv(name, before, kv_heads=4)[0]), name
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
    result = load(path).generate(tokens, max_new_tokens=3, do_sample=False, return_dict_in_generate=True,
                            pad_token_id=0)
    cache = result.past_key_values
    kv_layers = [layer for layer in cache.layers if hasattr(layer, "keys")]  # a hybrid's conv/Mamba states are not K/V
    return sum(t.numel() * t.element_size() for layer in kv_layers for t in (layer.keys, layer.values))


@pytest.mark.parametrize("arch", sorted(MULTIMODAL))
def test_multimodal_wrappers_keep_their_vision_tower(arch, tmp_path):
    """Only the language model's K/V heads are pooled: the vision tower's attention (4 heads of its own), the
    projector and the vision config are copied unchanged."""
    source = save(random_model(arch, kv_heads=4), tmp_path / "src")
    out = convert(source, 1, tmp_path)
    with safe_open(source / "model.safetensors", "pt") as a, safe_open(out / "model.safetensors", "pt") as b:
        changed = {k for k in a.keys() if a.get_slice(k).get_shape() != b.get_slice(k).get_shape()}
        kv = {k for k in a.keys() if re.search(r"layers\.[01]\.self_attn\.[kv]_proj\.", k) and "vision" not in k}
        assert changed == kv and len(kv) >= 4  # k and v of both layers (Qwen2-VL's biases too), under its own names
        kept = [k for k in a.keys() if k not in changed]
        assert all(torch.equal(a.get_tensor(k), b.get_tensor(k)) for k in kept)
    before, after = load(source).config, load(out).config
    assert after.vision_config.to_dict() == before.vision_config.to_dict()
    assert text_config(after).num_key_value_heads == 1 and text_config(before).num_key_value_heads == 4


def test_per_layer_attention_sizes_are_refused_naming_the_layer(tmp_path):
    """Gemma 4's full-attention layers have their own head size and KV heads (transformers' per_layer_config):
    one --groups cannot convert its layers alike, so it is refused in one line that names the layer."""
    config = AutoConfig.for_model("gemma4_text", vocab_size=96, hidden_size=64, intermediate_size=96,
                                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4, head_dim=16,
                                  global_head_dim=32, layer_types=["sliding_attention", "full_attention"],
                                  sliding_window=8)
    source = save(AutoModelForCausalLM.from_config(config), tmp_path / "src")
    with pytest.raises(UnsupportedModelError) as error:
        convert(source, 2, tmp_path)
    assert str(error.value) == ("model type 'gemma4_text': layer 1 has head_dim 32 where layer 0 has 16 (per-layer "
                                "attention sizes); gqa-convert converts models whose attention layers all share one "
                                "head layout")
    assert not (tmp_path / "out-mean-2").exists()


# A tiny Gemma 4 whose layers all have 4 KV heads of 16 dimensions; layer 1 is a full-attention layer whose keys are
# also its values (attention_k_eq_v), the layers that `num_global_key_value_heads` sets.
GEMMA4 = dict(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=4, head_dim=16, global_head_dim=16, attention_k_eq_v=True,
              layer_types=["sliding_attention", "full_attention"], sliding_window=8, vocab_size_per_layer_input=96,
              hidden_size_per_layer_input=8)


def test_global_layers_with_their_own_kv_heads_are_refused(tmp_path):
    """Gemma 4's full-attention ("global") layers may have fewer KV heads than its sliding layers, at the same head
    size (`num_global_key_value_heads`): refused in one line, not pooled alike with one num_key_value_heads."""
    config = AutoConfig.for_model("gemma4_text", **GEMMA4, num_global_key_value_heads=2)
    source = save(AutoModelForCausalLM.from_config(config), tmp_path / "src")
    with pytest.raises(UnsupportedModelError) as error:
        convert(source, 2, tmp_path)
    assert str(error.value) == ("model type 'gemma4_text': layer 1 has num_key_value_heads 2 where layer 0 has 4 "
                                "(per-layer attention sizes); gqa-convert converts models whose attention layers "
                                "all share one head layout")
    assert not (tmp_path / "out-mean-2").exists()


@pytest.mark.parametrize("per_layer", [
    {"num_global_key_value_heads": 4, "global_head_dim": 16},  # as Gemma 4's config.json on the Hub says it
    {"per_layer_config": {"1": {"num_key_value_heads": 4}}},  # as transformers' explicit per-layer config says it
], ids=["global-keys", "per-layer-config"])
def test_kv_heads_set_apart_from_num_key_value_heads_are_refused(per_layer, tmp_path, tokens):
    """A config.json can give layers the same KV heads as num_key_value_heads under another key: the model loads as
    one head layout, but writing only num_key_value_heads would leave layer 1 at 4 KV heads over 2-head weights.
    Refused in one line, by the dry run too, before anything is written."""
    config = AutoConfig.for_model("gemma4_text", **GEMMA4)
    source = save(AutoModelForCausalLM.from_config(config), tmp_path / "src")
    raw = json.loads((source / "config.json").read_text())
    raw.pop("per_layer_config", None)
    (source / "config.json").write_text(json.dumps({**raw, **per_layer}))
    message = ("model type 'gemma4_text': config.json sets layer 1's num_key_value_heads apart from "
               "num_key_value_heads, so the output would give it 4 where its converted weights have 2; gqa-convert "
               "rewrites only num_key_value_heads")
    for dry_run in (True, False):
        with pytest.raises(UnsupportedModelError) as error:
            convert_checkpoint(source, 2, tmp_path / "out", dry_run=dry_run, progress=False)
        assert str(error.value) == message
    assert not (tmp_path / "out").exists()
    same = convert_checkpoint(source, 4, tmp_path / "same", progress=False).output  # nothing pooled: nothing to refuse
    assert torch.equal(logits(same, tokens), logits(source, tokens))
