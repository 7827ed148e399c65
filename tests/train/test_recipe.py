"""Recipes are validated before anything starts: every shipped recipe loads, and each mistake names key and file."""

from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from gqa_uptrain.errors import ConfigError
from gqa_uptrain.train.recipe import Recipe, load_recipe

REPO = Path(__file__).resolve().parents[2]
RECIPES = sorted((REPO / "recipes").glob("*.yaml"))


def test_the_paper_recipes_and_the_template_are_shipped():
    names = {path.name for path in RECIPES}
    assert {"llama-2-7b-gqa8.yaml", "llama-2-7b-mqa.yaml", "template.yaml", "tiny-cpu.yaml"} <= names


def leaves(tree: dict, prefix: tuple = ()):
    """(dotted key path, value) for every scalar or list in a YAML tree."""
    for key, value in tree.items():
        if isinstance(value, dict):
            yield from leaves(value, (*prefix, key))
        else:
            yield (*prefix, key), value


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_every_shipped_recipe_validates(path):
    """Each recipe loads, and every value the file sets reaches the frozen recipe as written (nothing dropped)."""
    recipe = load_recipe(path)
    validated = recipe.model_dump(mode="json")
    for keys, written in leaves(yaml.safe_load(path.read_text())):
        if keys[0] not in Recipe.model_fields:  # gqa-pipeline's sections: training leaves them to the pipeline
            continue
        value = validated
        for key in keys:
            value = value[key]
        if isinstance(written, str) and isinstance(value, float):  # PyYAML reads `2.0e12` as a string
            written = float(written)
        assert value == written, ".".join(keys)
    assert Recipe.model_validate(validated) == recipe  # the dump is itself a valid recipe
    with pytest.raises(ValidationError, match="frozen"):
        recipe.seed = 1


PAPER_RECIPES = [p for p in RECIPES if p.name.startswith("llama-2-7b") and "1gpu" not in p.name]


@pytest.mark.parametrize("path", PAPER_RECIPES, ids=lambda p: p.name)
def test_paper_recipes_spend_five_percent_of_llama2_pretraining(path):
    recipe = load_recipe(path)
    assert recipe.budget.fraction == pytest.approx(0.05)
    assert recipe.budget.pretrain_tokens == pytest.approx(2.0e12)
    assert (REPO / "recipes" / "accelerate" / "fsdp.yaml").is_file()
    assert "recipes/accelerate/fsdp.yaml" in path.read_text()
    assert recipe.batch.global_batch % (recipe.batch.micro_batch * 8) == 0  # fits 8 GPUs


@pytest.mark.parametrize("path", sorted((REPO / "recipes" / "accelerate").glob("*.yaml")), ids=lambda p: p.name)
def test_accelerate_configs_load_through_accelerate(path):
    from accelerate.commands.config.config_args import load_config_from_file

    config = load_config_from_file(str(path))
    assert config.distributed_type.value in {"MULTI_GPU", "FSDP", "DEEPSPEED"}
    if config.distributed_type.value == "FSDP":  # FSDP2, full shard, one unit per decoder layer
        assert config.fsdp_config["fsdp_version"] == 2 and config.fsdp_config["fsdp_reshard_after_forward"] is True
        assert config.fsdp_config["fsdp_auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"
    if config.distributed_type.value == "DEEPSPEED":
        assert config.deepspeed_config["zero_stage"] == 3


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text((REPO / "recipes" / "tiny-cpu.yaml").read_text() + text)
    return path


def test_unknown_key_is_named_with_the_file(tmp_path):
    path = write(tmp_path, "\n")
    with pytest.raises(ConfigError, match=rf"{path}: train.learning_rate: unknown key"):
        load_recipe(path, ["train.learning_rate=0.1"])


def test_missing_key_is_named(tmp_path):
    path = tmp_path / "recipe.yaml"
    text = (REPO / "recipes" / "tiny-cpu.yaml").read_text().replace("  seq_len: 64\n", "")
    path.write_text(text)
    with pytest.raises(ConfigError, match=r"data.seq_len: missing required key"):
        load_recipe(path)


def test_ill_typed_key_is_named(tmp_path):
    with pytest.raises(ConfigError, match=r"batch.micro_batch: .*integer.*'four'"):
        load_recipe(write(tmp_path, ""), ["batch.micro_batch=four"])


def test_overrides_are_typed_like_yaml(tmp_path):
    recipe = load_recipe(write(tmp_path, ""), ["train.lr=1e-5", "budget.steps=7", "teacher.path=orig"])
    assert recipe.train.lr == 1e-5 and recipe.budget.steps == 7 and recipe.teacher.path == "orig"


def test_pyyaml_exponent_quirk_still_gives_a_float(tmp_path):
    """YAML 1.1 reads `2e12` as a string; the recipe still takes it as a number."""
    recipe = load_recipe(write(tmp_path, ""), ["budget.steps=null", "budget.tokens=2e12"])
    assert recipe.budget.tokens == 2e12


def test_budget_needs_exactly_one_form(tmp_path):
    with pytest.raises(ConfigError, match="budget: .*exactly one of"):
        load_recipe(write(tmp_path, ""), ["budget.tokens=1000"])
    with pytest.raises(ConfigError, match="needs `pretrain_tokens`"):
        load_recipe(write(tmp_path, ""), ["budget.steps=null", "budget.fraction=0.05"])


def test_bad_override_syntax_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="dotted.key=value"):
        load_recipe(write(tmp_path, ""), ["train.lr"])
    with pytest.raises(ConfigError, match="does not exist"):
        load_recipe(tmp_path / "nope.yaml")


def test_a_recipe_must_be_a_mapping(tmp_path):
    path = tmp_path / "list.yaml"
    path.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_recipe(path)


@pytest.mark.parametrize("override,expected", [
    ("data.holdout_doc=3", "data.holdout_doc: unknown key (did you mean holdout_docs?)"),
    ("budget.fractoin=0.1", "budget.fractoin: unknown key (did you mean fraction?)"),
    ("data.validation.pth=x", "data.validation.pth: unknown key (did you mean path?)"),
    ("evaluate_=1", "evaluate_: unknown key (did you mean evaluate?)"),  # gqa-pipeline's sections count too
    ("zzz=1", "zzz: unknown key"),
])
def test_a_misspelt_key_gets_a_suggestion_in_one_line(tmp_path, override, expected):
    path = write(tmp_path, "\n")
    with pytest.raises(ConfigError) as error:
        load_recipe(path, [override])
    assert str(error.value) == f"{path}: {expected}"


def test_the_one_gpu_recipe_trains_attention_only_distilling_from_its_source_and_fits_an_h100():
    from transformers import LlamaConfig

    from gqa_uptrain.apps.pipeline_recipe import PipelineRecipe
    from gqa_uptrain.train.estimate import GIB, Setup, Shape

    recipe = load_recipe(REPO / "recipes" / "llama-2-7b-gqa8-1gpu.yaml", schema=PipelineRecipe)
    assert recipe.train.trainable == "attention" and recipe.convert.method == "calibrated"
    assert recipe.teacher.path == recipe.convert.source and recipe.accelerate_config is None
    llama2 = dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                  vocab_size=32000, tie_word_embeddings=False, max_position_embeddings=4096)
    student = Shape.of(LlamaConfig(**llama2, num_key_value_heads=recipe.convert.groups))
    teacher = Shape.of(LlamaConfig(**llama2, num_key_value_heads=32))
    assert student.attention_params == 32 * (2 * 4096 * 4096 + 2 * 4096 * 1024)
    setup = Setup(recipe.batch.micro_batch, recipe.data.seq_len, "single", 1, recipe.model.gradient_checkpointing,
                  attention_only=True, frozen_bytes=2, teacher=teacher, teacher_shared=True)
    assert setup.memory(student).total(setup.checkpointing) < 72 * GIB  # the bound for an 80 GB GPU
