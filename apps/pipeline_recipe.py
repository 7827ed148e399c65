"""The pipeline's recipe: the training recipe plus the sections only gqa-pipeline reads.

One YAML file drives the whole pipeline. `PipelineRecipe` extends the training `Recipe` with how the model is
converted (`convert`), compared with its source (`evaluate`), published (`publish`) and launched
(`accelerate_config`), so the file is read and validated once, every section with the same one-line errors;
gqa-uptrain, given the same file, leaves these sections alone.
"""

from __future__ import annotations

from pathlib import Path

from gqa_uptrain.train import Recipe, Section, UserPath, load


class ConvertSpec(Section):
    """How `model.path` is made from the original checkpoint: gqa-convert's options of the same names, left out for
    its defaults (`method` too is gqa-convert's, kept to compare with a finished conversion's record). gqa-convert
    checks their values (convert's door `check_options`, before the first step)."""

    source: UserPath  # the original MHA (or GQA) checkpoint: a local folder or a Hub id
    groups: int
    method: str = "mean"  # a gqa-convert --method
    calibration: UserPath | None = None  # --calibration DATA for method calibrated (like the pretraining text)
    calibration_tokens: int | None = None
    refine_steps: int | None = None
    seed: int | None = None

    def options(self) -> dict:
        """The options given besides source and groups, as convert's door `convert_checkpoint` takes them."""
        return self.model_dump(exclude_none=True, exclude={"source", "groups"})


class EvaluateSpec(Section):
    """The gqa-eval comparison of the uptrained model with `convert.source`: gqa-eval's options of the same names,
    left out for its defaults. gqa-eval checks their values (eval's door `check_inputs`, before the first step)."""

    tasks: str | None = None  # lm-eval task names, or the shipped gqa_lastword,gqa_nextsentence
    num_fewshot: int | None = None
    batch_size: int | None = None
    limit: int | float | None = None  # documents per task; a fraction of them when it has a dot
    perplexity: UserPath | None = None  # held-out text: a file or a Hub dataset
    speed: bool | None = None

    def options(self) -> dict:
        """The options given, as eval's door `evaluate` takes them."""
        return self.model_dump(exclude_none=True)


class PublishSpec(Section):
    repo_id: str  # the Hub repository the pipeline uploads the model and its card to
    private: bool = False


class PipelineRecipe(Recipe):
    """Its new fields are exactly the training recipe's PIPELINE_SECTIONS (tests/apps/test_pipeline.py checks)."""

    accelerate_config: UserPath | None = None  # the launch config for this recipe's hardware (recipes/accelerate/)
    convert: ConvertSpec | None = None
    evaluate: EvaluateSpec | None = None
    publish: PublishSpec | None = None


def load_pipeline_recipe(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> PipelineRecipe:
    """Read, override and validate the whole recipe file; every problem is one ConfigError line."""
    return load(path, overrides, PipelineRecipe)
