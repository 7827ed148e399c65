"""One recipe file, two readers: the pipeline validates every section, training reads its own and leaves the rest."""

from pathlib import Path

import pytest

from gqa_uptrain.apps.pipeline_recipe import PipelineRecipe, load_pipeline_recipe
from gqa_uptrain.convert.methods import METHODS
from gqa_uptrain.errors import ConfigError
from gqa_uptrain.train.recipe import PIPELINE_SECTIONS, Recipe, load_recipe

REPO = Path(__file__).resolve().parents[2]
RECIPES = sorted((REPO / "recipes").glob("*.yaml"))


def test_the_pipeline_adds_exactly_the_sections_training_leaves_alone():
    assert set(PipelineRecipe.model_fields) - set(Recipe.model_fields) == PIPELINE_SECTIONS


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_every_shipped_recipe_validates_for_the_pipeline(path):
    recipe = load_pipeline_recipe(path)
    assert recipe.convert is None or recipe.convert.method in METHODS
    assert load_recipe(path).identity() == recipe.identity()


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text((REPO / "recipes" / "tiny-cpu.yaml").read_text() + text)
    return path


def test_training_ignores_pipeline_sections_but_still_refuses_unknown_keys(tmp_path):
    path = write(tmp_path, "\nconvert: {source: ./x, groups: 2, metod: mean}\n")
    assert not hasattr(load_recipe(path), "convert")
    with pytest.raises(ConfigError, match=r"convert.metod: unknown key"):
        load_pipeline_recipe(path)
    with pytest.raises(ConfigError, match=rf"{path}: converter: unknown key"):
        load_recipe(write(tmp_path, "\nconverter: {}\n"))
