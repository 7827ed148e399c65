"""gqa-uptrain: the uptraining loop (recipe -> budget -> data -> loop -> checkpoints -> export).

Where things happen: `recipe.py` validates the YAML, `budget.py` turns the paper's budget into steps and
FLOPs, `estimate.py` says what a run needs (memory per GPU, time, GPUs to fit) before it starts, `data.py`
tokenises and packs, `loop.py` takes the optimizer steps (`cadence.py` says when to log, evaluate and save),
`distill.py` holds the distillation loss, `checkpoint.py` saves and resumes, `metrics.py` logs, `export.py`
writes the final folder.

`uptrain` is the Python API; `gqa-uptrain` (cli.py) only parses flags and calls it. Importing this package imports
nothing heavy: torch and accelerate load when `uptrain` runs.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .recipe import Recipe


def load(recipe: str | Path | dict[str, Any] | Recipe, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """A validated recipe from a YAML file, its tree as a dict, or a Recipe, with dotted `key=value` overrides."""
    from .recipe import Recipe, load_recipe, recipe_from_tree

    if isinstance(recipe, Recipe):
        return recipe_from_tree(recipe.model_dump(mode="json"), overrides) if overrides else recipe
    if isinstance(recipe, dict):
        return recipe_from_tree(recipe, overrides)
    return load_recipe(recipe, overrides)


def uptrain(recipe: str | Path | dict[str, Any] | Recipe, overrides: list[str] | tuple[str, ...] = ()) -> Path:
    """Uptrain as `recipe` says (a YAML path, its tree as a dict, or a Recipe; `overrides` as on the command line,
    e.g. ["train.lr=1e-5"]) and return the exported model folder (output_dir/model), loadable with
    `AutoModelForCausalLM.from_pretrained`. Resumes from output_dir's newest checkpoint; a finished run returns at
    once. Under `accelerate launch` every process calls it. Mistakes raise `gqa_uptrain.errors` classes
    (ConfigError, DataError, ...)."""
    from .loop import run

    return run(load(recipe, overrides))
