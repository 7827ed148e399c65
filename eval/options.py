"""Every setting of a gqa-eval run, validated where it is built: by the CLI, the demo, a script or a test alike.

`EvalOptions` holds each option once, with its flag, default and help; cli.py makes the flags from it
(`gqa_uptrain.options.add_flags`), and `evaluate` builds it from its keywords. Unknown fields are refused, so a
misspelt option fails instead of doing nothing, and every mistake is one ConfigError naming the flag.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Annotated, Literal

from pydantic import AfterValidator, BeforeValidator, Field, field_validator, model_validator

from gqa_uptrain.options import Flag, Options
from gqa_uptrain.paths import check_output_folder, expand_home

from .cache import default_cache_dir

DType = Literal["auto", "float32", "bfloat16", "float16"]  # auto: the base checkpoint's own dtype
KVCache = Literal["none", "int8", "int4"]  # none: the model's own cache; intN: as transformers' QuantizedCache


def _at_least(low: int) -> AfterValidator:
    """A bound that says its flag's words ("--batch-size must be at least 1, got 0"), for a count or each in a list."""
    def check(value: int) -> int:
        if value < low:
            raise ValueError(f"must be at least {low}, got {value}")
        return value

    return AfterValidator(check)


# Flag readers only parse text; which values are allowed is EvalOptions' business, for every caller.
Count = Annotated[int, Flag(parse=int), _at_least(0)]
Positive = Annotated[int, Flag(parse=int), _at_least(1)]
PositiveOrNone = Annotated[Positive | None, Flag(parse=int)]  # a union's Flag is its own, outside it
# A path (or Hub id) as the user wrote it, `~` expanded.
UserPath = Annotated[Path, BeforeValidator(expand_home)]
UserRef = Annotated[str, BeforeValidator(expand_home)]


def _int_list(text: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _limit(text: str) -> int | float:
    value = float(text)
    return value if "." in text or not math.isfinite(value) else int(value)  # inf and nan: EvalOptions says no


def _bos(text: str) -> bool | None:
    choices = {"auto": None, "true": True, "false": False}
    if text not in choices:
        raise argparse.ArgumentTypeError("expected auto, true or false")
    return choices[text]


def default_device() -> str:
    import torch  # seconds to import: only when no device is given

    return "cuda" if torch.cuda.is_available() else "cpu"


class EvalOptions(Options):
    """The gqa-eval flags, one field each (see its --help; cli.py lays them out in sections)."""

    base: UserRef = Field(description="the original model: a local folder or a Hugging Face Hub id")
    models: Annotated[list[UserRef], Flag(("--model",), metavar="MODEL", action="append")] = Field(
        [], description="a converted (candidate) model to compare with the base; repeat for several")
    dtype: DType = Field("auto", description="weights dtype for every model (auto: the base checkpoint's own dtype)")
    device: str = Field(
        None, validate_default=True, description="torch device, or auto to spread a model too large for one GPU "
        "over all of them (default: cuda when available, else cpu)")

    tasks: str | None = Field(None, description="comma-separated task names, task folders or task YAML files")
    include_paths: Annotated[list[UserPath], Flag(("--include-path",), Path, "DIR", action="append")] = Field(
        [], description="an extra folder of lm-eval task YAMLs, whose tasks --tasks can name (repeatable); lm-eval "
        "reads relative data_files from the working directory")
    num_fewshot: Count = Field(0, description="few-shot examples per prompt (default %(default)s)")
    batch_size: Positive = Field(
        8, description="batch size for lm-eval and perplexity, the same for every model (default %(default)s)")
    limit: Annotated[int | float | None, Flag(parse=_limit)] = Field(
        None, description="evaluate only the first N documents of each task (a fraction if it has a dot)")
    seed: Annotated[int, Flag(parse=int)] = Field(1234, description="seed for lm-eval's few-shot sampling and RNGs")
    add_bos_token: Annotated[bool | None, Flag(parse=_bos, metavar="{auto,true,false}")] = Field(
        None, description="whether lm-eval puts BOS before each input; auto: what the base tokenizer does. Use false "
        "for lm-eval rolling-perplexity tasks (wikitext) with a BOS-adding tokenizer, or the BOS is doubled and scored")
    bootstrap_iters: Positive = Field(
        100_000, description="lm-eval bootstrap iterations for the stderr of non-mean metrics (perplexity)")

    perplexity: Annotated[UserRef | None, Flag(metavar="SOURCE")] = Field(
        None, description="held-out text: a .txt file (one document), a .json/.jsonl/.csv/.parquet file (optionally "
        ".xz/.gz) with a text column, or a Hub dataset NAME[:CONFIG]")
    perplexity_column: str = Field("text", description="text column of a dataset source (default %(default)s)")
    perplexity_split: str = Field("test", description="split of a Hub dataset source (default %(default)s)")
    perplexity_concat: bool = Field(
        False, description="join a dataset's rows into one text (for a line per row, as in wikitext); otherwise each "
        "row is a document with its own start token")
    perplexity_window: PositiveOrNone = Field(
        None, description="tokens per window (default: the base's max_position_embeddings, at most 4096)")
    perplexity_stride: PositiveOrNone = Field(
        None, description="tokens the window advances; each token is scored once, with at least window-stride tokens "
        "of context (default: window/2)")
    perplexity_max_tokens: PositiveOrNone = Field(None, description="score only the first N tokens of the source")

    kv_cache: Annotated[list[KVCache], Flag(metavar="{none,int8,int4}", nargs="+")] = Field(
        ["none"], min_length=1, description="KV caches to evaluate every model with (default %(default)s: the model's "
        "own). intN quantizes K and V as transformers' QuantizedCache does (N-bit integers, a scale and a zero-point "
        "per group of each token's head vector; the newest tokens in full precision) and counts KV-cache bytes the "
        "same way; each model gets a row per cache, e.g. --kv-cache none int4. Applies to --tasks and --perplexity; "
        "--speed runs on the unquantized cache only")
    kv_group_size: Positive = Field(
        64, description="elements per quantization group along head_dim (default %(default)s, transformers' "
        "q_group_size)")
    kv_residual: Count = Field(
        128, description="newest positions of each sequence kept in full precision (default %(default)s, "
        "transformers' residual_length; 0 quantizes every position)")

    speed: bool = Field(
        False, description="also measure the KV cache from a real generate() and decode throughput per model")
    speed_batch_sizes: Annotated[list[Positive], Flag(parse=_int_list, metavar="B1,B2")] = Field(
        [1, 8], min_length=1, description="decode batch sizes (default %(default)s)")
    speed_contexts: Annotated[list[Positive], Flag(parse=_int_list, metavar="C1,C2")] = Field(
        [512, 2048], min_length=1, description="context lengths (tokens in the cache) for decode (default "
        "%(default)s)")
    speed_new_tokens: Positive = Field(64, description="decode steps timed per case (default %(default)s)")

    output: Annotated[UserPath, Flag(parse=Path)] = Field(
        Path("gqa-eval-report"), validate_default=True,
        description="report folder (default ./%(default)s); its report files are replaced")
    cache_dir: Annotated[UserPath, Flag(parse=Path)] = Field(
        default_factory=default_cache_dir,
        description="results cache (default $XDG_CACHE_HOME/gqa_uptrain/eval, here %(default)s)")
    use_cache: Annotated[bool, Flag(("--no-cache",))] = Field(
        True, description="neither read nor write cached results: evaluate everything again")

    @field_validator("device", mode="before")
    @classmethod
    def _device_or_default(cls, value: str | None) -> str:
        """None (no --device) picks one when the options are built, so --help never imports torch to say which."""
        return default_device() if value is None else value

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
