"""--method calibrated beyond plain causal LMs: a multimodal wrapper's language model, calibrated alone (its vision
tower copied; Qwen2-VL's, which has no causal-LM class, as its text model), and MoE layers, whose experts the
checkpoint stores one by one and transformers stacks into 3-D parameters (tiny fp32 models, CPU)."""

from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from transformers import AutoConfig, Qwen2Config, Qwen2ForCausalLM

from gqa_uptrain.convert import convert_checkpoint
from gqa_uptrain.convert.calibration.layers import skeleton
from gqa_uptrain.convert.calibration.source import source_reader
from gqa_uptrain.convert.checkpoint_reader import CheckpointReader
from gqa_uptrain.errors import CheckpointError
from gqa_uptrain.kv_heads import kv_heads_of
from gqa_uptrain.provenance import read_provenance
from tiny_models import load, logits, random_model, repeat_kv_heads, write_token_rows

WRAPPERS = ["gemma3", "llava", "mistral3", "qwen2_vl"]
MOE = ["mixtral", "qwen2_moe", "qwen3_moe"]


@pytest.fixture(scope="module")
def calibration(tmp_path_factory) -> Path:
    """Token-id rows (the tiny models have no tokenizer): 16 sequences of 64 random tokens."""
    path = tmp_path_factory.mktemp("calibration") / "ids.jsonl"
    write_token_rows(path, 64)
    return path


def convert(source: Path, groups: int, out: Path, data: Path) -> Path:
    """The closed form alone (--refine-steps 0): it is what is exact on copies, and it is quick."""
    return convert_checkpoint(source, groups, out, method="calibrated", calibration=str(data),
                              calibration_tokens=1024, refine_steps=0, progress=False).output


def save(model, folder: Path) -> Path:
    model.save_pretrained(folder)
    return folder


def close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return bool((a - b).abs().max() <= 1e-3 * b.abs().max())


def changed_tensors(source: Path, out: Path) -> set[str]:
    """The names of the tensors the conversion did not copy bit for bit."""
    with safe_open(source / "model.safetensors", "pt") as a, safe_open(out / "model.safetensors", "pt") as b:
        assert set(a.keys()) == set(b.keys())
        return {name for name in a.keys() if a.get_slice(name).get_shape() != b.get_slice(name).get_shape()
                or not torch.equal(a.get_tensor(name), b.get_tensor(name))}


@pytest.mark.parametrize("arch", WRAPPERS + MOE)
def test_identical_kv_heads_convert_without_loss(arch, tmp_path, tokens, calibration):
    """Only the language model's attention changes: a wrapper's vision tower (whose attention tensors are named as
    the language model's are) and projector, and a MoE layer's router and experts, are copied."""
    small = random_model(arch, kv_heads=2, seed=1)
    source = save(repeat_kv_heads(small, 4), tmp_path / "src")
    out = convert(source, 2, tmp_path / "out", calibration)
    assert close(logits(out, tokens), logits(small, tokens))
    assert kv_heads_of(AutoConfig.from_pretrained(out)) == 2
    assert len(read_provenance(out)["conversion"]["calibration"]["layers"]) == 2  # fitted, not pooled
    changed = changed_tensors(source, out)
    assert changed and all(".self_attn." in name and "vision" not in name for name in changed)


@pytest.mark.parametrize("arch", WRAPPERS + MOE)
def test_same_head_count_changes_nothing(arch, tmp_path, tokens, calibration):
    source = save(random_model(arch, kv_heads=4, seed=2), tmp_path / "src")
    out = convert(source, 4, tmp_path / "out", calibration)
    assert torch.equal(logits(out, tokens), logits(source, tokens))


@pytest.mark.parametrize("arch", ["llava", "qwen2_vl", "mixtral", "qwen3_moe"])
def test_the_language_model_is_read_as_transformers_loads_it(arch, tmp_path, tokens):
    """Every parameter of the language model the calibration runs, read from the checkpoint by its own name (a
    wrapper's under `language_model`, experts stacked from the stored ones), makes a model that computes what the
    source does on text: Qwen2-VL's text model alone, on the positions its own forward makes (three equal M-RoPE
    streams), as the wrapper does on text."""
    source = save(random_model(arch, kv_heads=2, seed=3), tmp_path / "src")
    reader = source_reader(AutoConfig.from_pretrained(source), CheckpointReader(source))
    model = skeleton(reader.names.config, "cpu").eval()
    assert all(reader.names.has(name) for name in model.state_dict())
    model.load_state_dict({name: reader.read(name) for name in model.state_dict()})
    with torch.no_grad():
        hidden = [m.base_model(input_ids=tokens).last_hidden_state for m in (model, load(source))]
    assert close(*hidden)


def test_qwen2_vl_calibrates_as_the_qwen2_with_its_weights(tmp_path, calibration):
    """On text, Qwen2-VL's three M-RoPE position streams are equal (its text model's own forward makes them), so its
    rotary is plain RoPE: its language model is fitted bit for bit as a Qwen2 with the same weights is."""
    wrapper = random_model("qwen2_vl", kv_heads=4, seed=5)
    text = wrapper.config.text_config
    rope = {k: v for k, v in text.rope_parameters.items() if k != "mrope_section"}
    sizes = {k: v for k, v in text.to_dict().items() if k not in ("model_type", "rope_parameters")}
    qwen2 = Qwen2ForCausalLM(Qwen2Config(**sizes, rope_parameters=rope))
    qwen2.model.load_state_dict(wrapper.model.language_model.state_dict())
    fitted, expected = (load_file(convert(save(model, tmp_path / name), 2, tmp_path / f"{name}-out", calibration)
                                  / "model.safetensors") for name, model in (("wrapper", wrapper), ("qwen2", qwen2)))
    attention = [name for name in expected if ".self_attn." in name]  # model.layers.N...: the same names in both
    assert attention and all(torch.equal(fitted[name], expected[name]) for name in attention)


def test_a_nan_in_a_wrapper_is_named_by_the_checkpoint(tmp_path, calibration):
    """The calibration reads a wrapper's tensors by its language model's names; a refusal names what the user has."""
    model = repeat_kv_heads(random_model("llava", kv_heads=2, seed=4), 4)
    with torch.no_grad():
        model.get_input_embeddings().weight[5, 0] = float("nan")
    source = save(model, tmp_path / "src")
    with pytest.raises(CheckpointError, match=r"source tensor language_model\.model\.embed_tokens\.weight holds NaN"):
        convert(source, 2, tmp_path / "out", calibration)
