"""`train.trainable: attention`: only the attention projections learn, the rest is bit-identical in the export, and
a teacher that is the conversion's source shares the student's frozen body."""

import re

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForCausalLM

from gqa_uptrain.errors import ConfigError
from gqa_uptrain.train.loop import run
from gqa_uptrain.train.recipe import load_recipe
from gqa_uptrain.train.shared_teacher import NotShared, shared_body_teacher
from gqa_uptrain.train.trainable import attention_parameter_names, select_trainable

from tiny_models import ARCHITECTURES, MULTIMODAL, random_model

from .conftest import PROJECTIONS, TINY_RECIPE, changed_tensors, overrides


@pytest.fixture(scope="module")
def converted(converted_tiny_llama):
    return converted_tiny_llama


@pytest.mark.parametrize("model_type", [*ARCHITECTURES, *MULTIMODAL])
def test_the_trainable_set_is_the_language_models_attention_projections(model_type):
    model = random_model(model_type, kv_heads=2)
    names = attention_parameter_names(model)
    assert names and all(name.split(".")[-2] in PROJECTIONS for name in names)
    assert not any("vision" in name for name in names)  # a wrapper's vision tower was not converted
    layers = getattr(model.config.get_text_config(), "num_hidden_layers")
    assert {re.search(r"\.(\d+)\.", name).group(1) for name in names} == {str(i) for i in range(layers)}


def test_select_trainable_freezes_the_rest_in_the_checkpoint_dtype():
    model = random_model("qwen2", kv_heads=2)
    learning = select_trainable(model, "attention", torch.bfloat16)
    for name, parameter in model.named_parameters():
        learns = name in attention_parameter_names(model)
        assert parameter.requires_grad == learns
        assert parameter.dtype == (torch.float32 if learns else torch.bfloat16)
    assert learning.trainable == sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert learning.trainable + learning.frozen == sum(p.numel() for p in model.parameters())
    everything = random_model("qwen2", kv_heads=2)
    assert select_trainable(everything, "all", None).frozen == 0
    assert all(p.requires_grad for p in everything.parameters())


def test_attention_only_training_leaves_the_rest_bit_identical(tmp_path, converted, shakespeare, fresh_accelerate):
    output = tmp_path / "run"
    recipe = load_recipe(TINY_RECIPE, overrides(converted, shakespeare, output, "train.trainable=attention",
                                                "budget.steps=6"))
    target = run(recipe).model
    learned = {name for name in load_file(converted / "model.safetensors") if name.split(".")[-2] in PROJECTIONS}
    assert changed_tensors(converted, target) == learned  # every projection moved, nothing else by a bit


def test_a_bf16_checkpoint_trains_attention_only_in_fp32_and_exports_its_body_bit_identical(
        tmp_path, converted, shakespeare, fresh_accelerate):
    """Without autocast (precision fp32, as on a CPU), frozen bf16 weights would meet fp32 activations: they are held
    in fp32 instead, which bf16 round-trips exactly."""
    half = tmp_path / "bf16"
    AutoModelForCausalLM.from_pretrained(converted, dtype=torch.bfloat16).save_pretrained(half)
    for name in ("tokenizer.json", "tokenizer_config.json", "gqa_provenance.json"):
        if (converted / name).is_file():
            (half / name).write_bytes((converted / name).read_bytes())
    recipe = load_recipe(TINY_RECIPE, overrides(half, shakespeare, tmp_path / "run", "train.trainable=attention",
                                                "budget.steps=2"))
    target = run(recipe).model
    assert load_file(target / "model.safetensors")["model.norm.weight"].dtype == torch.bfloat16
    changed = changed_tensors(half, target)
    assert changed and all(name.split(".")[-2] in PROJECTIONS for name in changed)


def test_switching_the_trainable_set_is_another_run(tmp_path, converted, shakespeare):
    base = overrides(converted, shakespeare, tmp_path)
    assert (load_recipe(TINY_RECIPE, base).identity()
            != load_recipe(TINY_RECIPE, [*base, "train.trainable=attention"]).identity())
    with pytest.raises(ConfigError, match="train.trainable"):
        load_recipe(TINY_RECIPE, [*base, "train.trainable=mlp"])


def _student(folder):
    model = AutoModelForCausalLM.from_pretrained(folder)
    select_trainable(model, "attention", torch.float32)
    return model


def test_the_shared_teacher_computes_the_original_with_one_copy_of_the_body(tiny_llama, converted):
    student = _student(converted)
    teacher = shared_body_teacher(student, tiny_llama, AutoConfig.from_pretrained(tiny_llama), "sdpa",
                                  torch.device("cpu"))
    original = AutoModelForCausalLM.from_pretrained(tiny_llama).eval()
    ids = torch.randint(0, student.config.vocab_size, (2, 24))
    with torch.no_grad():
        torch.testing.assert_close(teacher(input_ids=ids).logits, original(input_ids=ids).logits, rtol=0, atol=1e-5)
    mine = {id(p) for p in student.parameters() if not p.requires_grad}
    theirs = {id(p) for p in teacher.parameters()}
    assert mine <= theirs  # the body is the student's own tensors
    new = sum(p.numel() for p in teacher.parameters() if id(p) not in mine)
    attention = sum(p.numel() for n, p in original.named_parameters() if n in attention_parameter_names(original))
    assert new == attention  # and the teacher's attention is all it adds


def test_a_teacher_whose_body_differs_is_not_shared(tmp_path, tiny_llama, converted):
    other = AutoModelForCausalLM.from_pretrained(tiny_llama)
    with torch.no_grad():
        other.model.layers[1].mlp.up_proj.weight[0, 0] += 1e-3
    other.save_pretrained(tmp_path / "other")
    with pytest.raises(NotShared, match="layers.1.mlp.up_proj.weight differs"):
        shared_body_teacher(_student(converted), tmp_path / "other", other.config, "sdpa", torch.device("cpu"))
    wider = AutoConfig.from_pretrained(tiny_llama)
    wider.rope_parameters = {**wider.rope_parameters, "rope_theta": 1234.0}
    with pytest.raises(NotShared, match="config differs"):
        shared_body_teacher(_student(converted), tiny_llama, wider, "sdpa", torch.device("cpu"))


@pytest.mark.slow
def test_distillation_with_a_shared_teacher_matches_a_separate_one(tmp_path, tiny_llama, converted, shakespeare,
                                                                   fresh_accelerate, capsys):
    """The same run, teacher shared or placed apart (a teacher placement of `shard` never shares), gives the same
    model: sharing changes memory, not the result."""
    runs = {}
    for placement in ("auto", "shard"):
        output = tmp_path / placement
        recipe = load_recipe(TINY_RECIPE, overrides(
            converted, shakespeare, output, "train.trainable=attention", f"teacher.path={tiny_llama}",
            f"teacher.placement={placement}", "budget.steps=4"))
        runs[placement] = load_file(run(recipe).model / "model.safetensors")
        fresh_accelerate_state()
    printed = capsys.readouterr().out
    assert printed.count("shares the student's frozen body") == 1
    for name, tensor in runs["auto"].items():
        torch.testing.assert_close(tensor, runs["shard"][name], rtol=0, atol=1e-6)


def fresh_accelerate_state():
    from gqa_uptrain.train.loop import reset_accelerate_state

    reset_accelerate_state()
