"""gqa-uptrain: the uptraining loop (recipe -> budget -> data -> loop -> checkpoints -> export).

Where things happen: `recipe.py` validates the YAML, `budget.py` turns the paper's budget into steps and
FLOPs, `estimate.py` says what a run needs (memory per GPU, time, GPUs to fit) before it starts, `data.py`
tokenises and packs, `loop.py` takes the optimizer steps (`cadence.py` says when to log, validate and save),
`distill.py` holds the distillation loss, `checkpoint.py` saves and resumes, `export.py` writes the final folder.
What a run reports: `throughput.py` (tokens/s, MFU and its peak), `progress.py` (the console), `losses.py` (the loss
window and divergence), `recovery.py` (the share of the conversion's gap won back), `history.py` (metrics.jsonl),
`trackers.py` (TensorBoard, W&B), `loss_curve.py` (the PNG).

`uptrain` is the Python API (it returns an `UptrainingResult`, result.py); `gqa-uptrain` (cli.py) only parses flags
and calls it. The door is `__all__`: apps use nothing else (tests/test_layout.py). Importing this package imports
nothing heavy: torch and accelerate load when `uptrain` runs, and the names below that live in other modules are
imported when first used.
"""

from __future__ import annotations

from importlib import import_module
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    from .estimate import accelerate_config_file
    from .preflight import check_model_unchanged, check_output_dir, started_from
    from .recipe import Recipe, Section, UserPath
    from .result import UptrainingResult

    R = TypeVar("R", bound=Recipe)

__all__ = ["uptrain", "UptrainingResult", "load", "Recipe", "Section", "UserPath", "check_output_dir", "started_from",
           "check_model_unchanged", "accelerate_config_file"]
# The door's names defined in other modules -> that module, imported on first use (PEP 562): what `uptrain` returns,
# the recipe's model and its parts (which gqa-pipeline's recipe extends), and what a caller that plans a run before
# starting it (gqa-pipeline) asks of an output_dir and of a launch config.
_ELSEWHERE = {"UptrainingResult": "result", "Recipe": "recipe", "Section": "recipe", "UserPath": "recipe",
              "check_output_dir": "preflight", "started_from": "preflight", "check_model_unchanged": "preflight",
              "accelerate_config_file": "estimate"}


def __getattr__(name: str) -> Any:
    if name not in _ELSEWHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(import_module(f"{__name__}.{_ELSEWHERE[name]}"), name)


def load(recipe: str | Path | dict[str, Any] | Recipe, overrides: list[str] | tuple[str, ...] = (),
         schema: type[R] | None = None) -> R:
    """A validated recipe from a YAML file, its tree as a dict, or a Recipe, with dotted `key=value` overrides;
    `schema`: a Recipe subclass to validate with (one with more sections, as gqa-pipeline's), default Recipe."""
    from .recipe import Recipe, load_recipe, recipe_from_tree

    schema = schema or Recipe
    if isinstance(recipe, schema) and not overrides:
        return recipe
    if isinstance(recipe, Recipe):
        return recipe_from_tree(recipe.model_dump(mode="json"), overrides, schema)
    if isinstance(recipe, dict):
        return recipe_from_tree(recipe, overrides, schema)
    return load_recipe(recipe, overrides, schema)


def uptrain(recipe: str | Path | dict[str, Any] | Recipe,
            overrides: list[str] | tuple[str, ...] = ()) -> UptrainingResult:
    """Uptrain as `recipe` says (a YAML path, its tree as a dict, or a Recipe; `overrides` as on the command line,
    e.g. ["train.lr=1e-5"]) and return an `UptrainingResult`: the exported model folder (`model`: output_dir/model,
    loadable with `AutoModelForCausalLM.from_pretrained`), the provenance record written there, its steps and
    tokens, the final training and validation losses. Resumes from output_dir's newest checkpoint; a finished run
    returns at once, with what its folder holds. Under `accelerate launch` every process calls it and returns the
    result (the main process writes the record). Mistakes raise `gqa_uptrain.errors` classes (ConfigError,
    DataError, ...)."""
    from .loop import run

    return run(load(recipe, overrides))
