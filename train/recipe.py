"""The recipe: one YAML file validated into a typed, frozen config before anything starts.

Unknown, missing or ill-typed keys raise ConfigError naming the dotted key and the file. Dotted command-line
overrides (`train.lr=1e-5`) are applied to the YAML tree first, so they are validated the same way.

A recipe file may also hold gqa-pipeline's sections (`PIPELINE_SECTIONS`: how the model is converted, evaluated,
published and launched). Training neither reads nor checks them: `gqa_uptrain.apps.pipeline_recipe` extends `Recipe`
with them and validates the whole file. Only the dry run reads two of them (`PlanningRecipe`): how training is
launched, and which source and KV head count `model.path` will hold once converted.
"""

from __future__ import annotations

import copy
import difflib
import types
import typing
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, model_validator

from gqa_uptrain.errors import ConfigError, one_line
from gqa_uptrain.paths import expand_home

# A path (or Hub id) as the recipe writes it, `~` expanded: every path a recipe holds is one of these.
UserPath = Annotated[str, BeforeValidator(expand_home)]


class Section(BaseModel):
    """A section of a recipe: frozen, and a key it does not know is refused (a misspelt option must not do nothing).
    gqa-pipeline's own sections are Sections too."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelSpec(Section):
    path: UserPath  # the converted (GQA) checkpoint: a local folder or a Hub id
    attn_implementation: Literal["sdpa", "flash_attention_2", "flex_attention", "eager"] = "sdpa"
    gradient_checkpointing: bool = False
    compile: bool = False


class TeacherSpec(Section):
    path: UserPath  # usually the original MHA checkpoint
    weight: float = Field(0.5, ge=0.0, le=1.0)  # loss = (1 - weight) * LM + weight * KL
    temperature: float = Field(1.0, gt=0.0)
    # replicate: a whole copy per device; shard: split over the processes (train/teacher.py);
    # auto: shard under FSDP and DeepSpeed ZeRO-3, replicate otherwise
    placement: Literal["auto", "replicate", "shard"] = "auto"


class SourceSpec(Section):
    path: UserPath | None = None  # local file, folder or glob of .txt / .jsonl / .json / .parquet (.gz/.xz/.zst)
    dataset: str | None = None  # a Hub dataset name
    name: str | None = None  # the Hub dataset's configuration
    split: str = "train"
    text_field: str = "text"  # ignored when the rows already hold `input_ids`
    sample_by: Literal["line", "paragraph", "document"] = "paragraph"  # plain-text files only

    @model_validator(mode="after")
    def _one_origin(self) -> SourceSpec:
        if (self.path is None) == (self.dataset is None):
            raise ValueError("give exactly one of `path` (local files) or `dataset` (a Hub dataset)")
        return self


class DataSpec(Section):
    train: SourceSpec
    validation: SourceSpec | None = None  # None: hold out the first `holdout_docs` documents of train
    holdout_docs: int = Field(200, ge=1)
    seq_len: int = Field(gt=1)
    streaming: bool = False
    shuffle_buffer: int = Field(10_000, ge=1)  # documents; streaming only
    num_proc: int | None = Field(None, ge=1)  # tokenisation workers; not streaming


class BatchSpec(Section):
    micro_batch: int = Field(ge=1)  # sequences per process per forward
    global_batch: int = Field(ge=1)  # sequences per optimizer step, all processes together


class TrainSpec(Section):
    lr: float = Field(gt=0.0)
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_steps: int = Field(0, ge=0)
    min_lr_ratio: float = Field(0.1, ge=0.0, le=1.0)
    weight_decay: float = Field(0.1, ge=0.0)
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = Field(1e-8, gt=0.0)
    grad_clip: float | None = Field(1.0, gt=0.0)
    precision: Literal["auto", "bf16", "fp16", "fp32"] = "auto"  # auto: bf16 on GPUs that have it, else fp32
    # all: every parameter learns; attention: only the attention projections the conversion changed (train/trainable.py)
    trainable: Literal["all", "attention"] = "all"


class BudgetSpec(Section):
    fraction: float | None = Field(None, gt=0.0)  # of pretrain_tokens
    tokens: float | None = Field(None, gt=0.0)
    steps: int | None = Field(None, ge=1)
    pretrain_tokens: float | None = Field(None, gt=0.0)  # tokens the original model was pretrained on

    @model_validator(mode="after")
    def _one_budget(self) -> BudgetSpec:
        if sum(value is not None for value in (self.fraction, self.tokens, self.steps)) != 1:
            raise ValueError("give exactly one of `fraction`, `tokens` or `steps`")
        if self.fraction is not None and self.pretrain_tokens is None:
            raise ValueError("`fraction` needs `pretrain_tokens`")
        return self


class CheckpointSpec(Section):
    every: int = Field(1000, ge=1)  # optimizer steps; a checkpoint is also written at the end
    keep: int = Field(2, ge=1)


class EvalSpec(Section):
    every: int = Field(500, ge=1)  # optimizer steps; also evaluated at the end
    batches: int = Field(20, ge=1)  # micro-batches per process


class LogSpec(Section):
    every: int = Field(10, ge=1)
    trackers: list[Literal["tensorboard", "wandb"]] = ["tensorboard"]
    project: str = "gqa-uptrain"
    peak_tflops: float | None = Field(None, gt=0.0)  # per device, for MFU; None: known GPUs only


# Top-level keys of gqa-pipeline's own sections, which training leaves alone (see the module docstring).
PIPELINE_SECTIONS = frozenset({"accelerate_config", "convert", "evaluate", "publish"})


class Recipe(Section):
    output_dir: UserPath
    seed: int = 0
    model: ModelSpec
    teacher: TeacherSpec | None = None
    data: DataSpec
    batch: BatchSpec
    train: TrainSpec
    budget: BudgetSpec
    checkpoint: CheckpointSpec = CheckpointSpec()
    eval: EvalSpec = EvalSpec()
    log: LogSpec = LogSpec()

    @model_validator(mode="before")
    @classmethod
    def _leave_pipeline_sections(cls, tree: Any) -> Any:
        """Drop gqa-pipeline's sections unless this model declares them; any other unknown key is still refused."""
        if not isinstance(tree, dict):
            return tree
        return {key: value for key, value in tree.items() if key not in PIPELINE_SECTIONS or key in cls.model_fields}

    def identity(self) -> dict[str, Any]:
        """What decides the weights: a resumed run must agree on all of it (folder, cadence, logging and where the
        teacher is placed may change)."""
        kept = set(Recipe.model_fields) - {"output_dir", "checkpoint", "eval", "log"}
        tree = self.model_dump(mode="json", include=kept)
        if tree.get("teacher"):
            tree["teacher"].pop("placement", None)
        return tree


R = TypeVar("R", bound=Recipe)


class PlannedConversion(BaseModel):
    """The part of gqa-pipeline's `convert` section a dry run plans from (the rest is the pipeline's to check)."""

    model_config = ConfigDict(extra="ignore", frozen=True)
    source: UserPath
    groups: int = Field(ge=1)


class PlanningRecipe(Recipe):
    """A recipe as `--dry-run` reads it: with the accelerate config it is launched with and, before the conversion,
    the source and KV head count `model.path` will hold."""

    accelerate_config: UserPath | None = None
    convert: PlannedConversion | None = None


def load_recipe(path: str | Path, overrides: list[str] | tuple[str, ...] = (), schema: type[R] = Recipe) -> R:
    """Read, override and validate a recipe as `schema` (the training recipe, or a model extending it); every
    problem is one ConfigError line naming key and file."""
    path = expand_home(Path(path))
    try:
        tree = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"recipe {path} does not exist") from None
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: not valid YAML ({one_line(error)})") from None
    return recipe_from_tree(tree, overrides, schema, origin=path)


def recipe_from_tree(tree: Any, overrides: list[str] | tuple[str, ...] = (), schema: type[R] = Recipe,
                     origin: str | Path = "recipe") -> R:
    """A recipe from its YAML tree (a dict, as the Python API takes it), overridden and validated like a file;
    `origin` names it in messages. The tree is not modified."""
    if not isinstance(tree, dict):
        raise ConfigError(f"{origin}: a recipe is a mapping of sections, got {type(tree).__name__}")
    tree = copy.deepcopy(tree)
    for override in overrides:
        _apply_override(tree, override, origin)
    try:
        return schema.model_validate(tree)
    except ValidationError as error:
        raise ConfigError(f"{origin}: " + "; ".join(_describe(item, schema) for item in error.errors())) from None


def _apply_override(tree: dict, override: str, path: str | Path) -> None:
    key, sep, text = override.partition("=")
    if not sep or not key:
        raise ConfigError(f"override {override!r} for {path}: write it as dotted.key=value")
    *parents, leaf = key.split(".")
    node = tree
    for part in parents:
        if not isinstance(node.get(part), dict):
            node[part] = {}
        node = node[part]
    node[leaf] = yaml.safe_load(text)


def _describe(item: dict, schema: type[BaseModel] = Recipe) -> str:
    key = ".".join(str(part) for part in item["loc"]) or "(top level)"
    if item["type"] == "missing":
        return f"{key}: missing required key"
    if item["type"] == "extra_forbidden":
        close = difflib.get_close_matches(str(item["loc"][-1]), _keys_at(schema, item["loc"][:-1]), n=1, cutoff=0.6)
        return f"{key}: unknown key" + (f" (did you mean {close[0]}?)" if close else "")
    return f"{key}: {item['msg']} (got {item.get('input')!r})"


def _keys_at(schema: type[BaseModel], section: tuple) -> list[str]:
    """The keys the section at `section` (a path of keys from the top) accepts; [] where that is not a section."""
    model: type[BaseModel] | None = schema
    for part in section:
        field = model.model_fields.get(part) if isinstance(part, str) else None
        if field is None:
            return []
        options = typing.get_args(field.annotation) if isinstance(field.annotation, types.UnionType) else (
            field.annotation,)
        model = next((t for t in options if isinstance(t, type) and issubclass(t, BaseModel)), None)
        if model is None:
            return []
    return [*model.model_fields, *(PIPELINE_SECTIONS if not section else ())]
