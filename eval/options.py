"""Every setting of a gqa-eval run, validated where it is built: by the CLI, the demo, a script or a test alike.

One pydantic model with unknown fields forbidden, so a misspelt option fails instead of doing nothing. Every
mistake becomes one ConfigError naming the flag; `cli.py`'s flags map one to one onto these fields.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated, Any, Literal, get_args

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, field_validator, model_validator

from gqa_uptrain.errors import ConfigError
from gqa_uptrain.paths import check_output_folder, expand_home

from .cache import default_cache_dir

DType = Literal["auto", "float32", "bfloat16", "float16"]  # auto: the base checkpoint's own dtype
DTYPE_NAMES = get_args(DType)
KVCache = Literal["none", "int8", "int4"]  # none: the model's own cache; intN: quantized as transformers' QuantizedCache
KV_CACHE_NAMES = get_args(KVCache)
# Fields whose flag is not `--` + the field name with dashes.
FLAGS = {"models": "--model", "include_paths": "--include-path", "use_cache": "--no-cache"}

Positive = Annotated[int, Field(ge=1)]
# A path (or Hub id) as the user wrote it, `~` expanded.
UserPath = Annotated[Path, BeforeValidator(expand_home)]
UserRef = Annotated[str, BeforeValidator(expand_home)]


def default_device() -> str:
    import torch  # seconds to import: only when no device is given

    return "cuda" if torch.cuda.is_available() else "cpu"


class EvalOptions(BaseModel):
    """Every setting of a gqa-eval run (the CLI flags, one to one); bad values raise ConfigError here."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    base: UserRef
    models: list[UserRef]
    output: UserPath
    tasks: str | None = None
    include_paths: list[UserPath] = []
    num_fewshot: int = Field(0, ge=0)
    batch_size: Positive = 8
    limit: int | float | None = None  # documents per task; a fraction of them when a float
    seed: int = 1234
    dtype: DType = "auto"
    device: str = Field(default_factory=default_device)
    add_bos_token: bool | None = None
    bootstrap_iters: Positive = 100_000
    perplexity: UserRef | None = None
    perplexity_column: str = "text"
    perplexity_split: str = "test"
    perplexity_concat: bool = False
    perplexity_window: Positive | None = None
    perplexity_stride: Positive | None = None
    perplexity_max_tokens: Positive | None = None
    speed: bool = False
    speed_batch_sizes: list[Positive] = Field([1, 8], min_length=1)
    speed_contexts: list[Positive] = Field([512, 2048], min_length=1)
    speed_new_tokens: Positive = 64
    kv_cache: list[KVCache] = Field(["none"], min_length=1)
    kv_group_size: Positive = 64  # transformers' QuantizedCache defaults (q_group_size, residual_length)
    kv_residual: int = Field(128, ge=0)
    cache_dir: UserPath = Field(default_factory=default_cache_dir)
    use_cache: bool = True

    def __init__(self, **values: Any) -> None:
        try:
            super().__init__(**values)
        except ValidationError as error:
            raise ConfigError("; ".join(_describe(item) for item in error.errors())) from None

    @field_validator("limit")
    @classmethod
    def _positive_limit(cls, value: int | float | None) -> int | float | None:
        if value is not None and not math.isfinite(value):
            raise ValueError(f"must be a number of documents (or a fraction of them with a dot), got {value}")
        if value is not None and value <= 0:
            raise ValueError(f"must be positive, got {value}")
        return value

    @field_validator("output")
    @classmethod
    def _output_folder(cls, value: Path) -> Path:
        """A report folder that cannot be one (a file, a dangling link, read-only) is refused before any model is
        evaluated, not when the first report is written (OutputError, not a ValueError: pydantic lets it through)."""
        check_output_folder(value, "--output")
        return value

    @field_validator("kv_cache")
    @classmethod
    def _distinct_kv_caches(cls, value: list[str]) -> list[str]:
        if len(set(value)) < len(value):
            raise ValueError(f"names a cache twice: {' '.join(value)}")
        return value

    @model_validator(mode="after")
    def _something_to_measure(self) -> EvalOptions:
        if not self.tasks and not self.perplexity and not self.speed:
            raise ValueError("nothing to measure: give --tasks, --perplexity and/or --speed")
        return self


def _describe(item: dict) -> str:
    """One pydantic error as one clause naming the flag."""
    field = str(item["loc"][0]) if item["loc"] else None
    flag = FLAGS.get(field, f"--{field.replace('_', '-')}") if field else "options"
    context = item.get("ctx") or {}
    kind = item["type"]
    if kind == "extra_forbidden":
        return f"unknown option {field!r}"
    if kind == "missing":
        return f"{flag} is required"
    if kind == "greater_than_equal":
        return f"{flag} must be at least {context['ge']}, got {item['input']}"
    if kind == "value_error":
        return f"{flag} {context['error']}" if field else str(context["error"])
    return f"{flag}: {item['msg']} (got {item['input']!r})"
