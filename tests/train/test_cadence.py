"""When the loop logs, evaluates and saves: every N steps, and always at the last step."""

from gqa_uptrain.train.cadence import Cadence


def test_each_event_comes_every_n_steps_and_at_the_last_step():
    cadence = Cadence(steps=10, log_every=3, eval_every=5, save_every=20)
    steps = range(1, 11)
    assert [s for s in steps if cadence.log(s)] == [3, 6, 9, 10]
    assert [s for s in steps if cadence.validate(s)] == [5, 10]
    assert [s for s in steps if cadence.save(s)] == [10]


def test_the_cadence_comes_from_the_recipe_sections(tmp_path):
    from gqa_uptrain.train.recipe import load_recipe

    from .conftest import TINY_RECIPE

    recipe = load_recipe(TINY_RECIPE, ["log.every=2", "eval.every=4", "checkpoint.every=8"])
    assert Cadence.of(recipe, 30) == Cadence(steps=30, log_every=2, eval_every=4, save_every=8)
