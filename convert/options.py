"""Every setting of a conversion, validated where it is built: by `gqa-convert`, the pipeline, a script or a test.

`ConvertOptions` holds each option once, with its default and its help; cli.py makes the flags from it
(`gqa_uptrain.options.add_flags`), and `convert_checkpoint` builds it from its keywords. Bad values raise ConfigError
here, before anything is read.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BeforeValidator, Field, field_validator, model_validator

from gqa_uptrain.convert.methods import METHODS
from gqa_uptrain.options import Flag, Options, whole_number
from gqa_uptrain.paths import expand_home

DEFAULT_CALIBRATION_TOKENS = 32_768
DEFAULT_REFINE_STEPS = 200
MAX_SEED = 2**32 - 1  # as numpy's; torch's generators take seed * 1_000_003 + a name's CRC (pooling.py) below 2**64
MethodName = Literal[tuple(METHODS)]


class ConvertOptions(Options):
    """The `gqa-convert` flags, one field each (see its --help); `method` is a name in `METHODS`."""

    source: Annotated[str, Flag(("SOURCE",)), BeforeValidator(lambda value: expand_home(str(value)))] = Field(
        description="a local model folder or a Hugging Face Hub id (HF_TOKEN, the local cache and HF_HUB_OFFLINE are "
                    "honoured)")
    groups: Annotated[int, Flag(("-g", "--groups"), int)] = Field(
        description="KV heads of the converted model: 1 gives multi-query attention; must divide the source's KV "
                    "heads")
    output: Annotated[Path | None, Flag(("-o", "--output"), Path), BeforeValidator(expand_home)] = Field(
        None, description="output folder (default: ./<name>-gqa<G>, or ./<name>-mqa for --groups 1)")
    method: MethodName = Field(
        "mean", description="how the KV heads of a group become one: " + ", ".join(
            f"{m.name} ({m.explained})" for m in METHODS.values()) + " (default: %(default)s)")
    calibration: Annotated[str | None, Flag(metavar="DATA")] = Field(
        None, description="text for --method calibrated: a local .txt/.jsonl/.parquet file (optionally compressed), "
        "folder or glob, or a Hub dataset id; rows with input_ids are used as they are (default: public-domain books "
        "shipped with gqa-uptrain, offline; text like the model's pretraining data fits it better)")
    calibration_tokens: Annotated[int, Flag(parse=whole_number, metavar="N")] = Field(
        DEFAULT_CALIBRATION_TOKENS, description="calibration tokens for --method calibrated, as whole sequences of up "
        "to 512 tokens (default: %(default)s; more fits more closely and takes longer)")
    refine_steps: Annotated[int, Flag(parse=whole_number, metavar="N")] = Field(
        DEFAULT_REFINE_STEPS, description="for --method calibrated: after the closed form, up to N steps of gradient "
        "descent per layer so the converted layer reproduces the original layer's output; held-out calibration "
        "sequences pick the step kept, or none (default: %(default)s; 0: the closed form alone, faster)")
    seed: Annotated[int, Flag(parse=whole_number)] = Field(
        0, description="seed for --method random and for the order of calibration documents (default: %(default)s)")
    revision: str | None = Field(None, description="branch, tag or commit of a Hub SOURCE (default: main)")
    max_shard_bytes: Annotated[int, Flag(("--max-shard-size",), metavar="SIZE")] = Field(
        "5GB", validate_default=True, description="largest safetensors shard, e.g. 5GB or 500MB (default: "
        "%(default)s); a smaller model is written as one model.safetensors")
    context: Annotated[int, Flag(parse=int)] = Field(
        4096, description="context length at which --dry-run reports the KV-cache size of one sequence (default: "
        "%(default)s)")
    dry_run: bool = Field(
        False, description="print the plan (KV heads, KV-cache bytes, parameters, files) and write nothing; a Hub id "
        "is planned from its config and safetensors headers, without downloading the weights")
    force: bool = Field(
        False, description="replace OUTPUT if it is a model folder that gqa-convert or gqa-uptrain wrote (its "
        "gqa_provenance.json says so), swapping the new one in once it is complete; any other folder or file is "
        "refused")

    @field_validator("calibration_tokens")
    @classmethod
    def _positive_tokens(cls, tokens: int) -> int:
        if tokens < 1:
            raise ValueError(f"must be positive, got {tokens}")
        return tokens

    @field_validator("refine_steps")
    @classmethod
    def _steps_or_none(cls, steps: int) -> int:
        if steps < 0:
            raise ValueError(f"must be 0 (no refinement) or more, got {steps}")
        return steps

    @field_validator("seed", mode="before")
    @classmethod
    def _seed_in_range(cls, seed: Any) -> int:
        if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= MAX_SEED:
            raise ValueError(f"must be a whole number from 0 to {MAX_SEED:,}, got {seed!r}")
        return seed

    @field_validator("max_shard_bytes", mode="before")
    @classmethod
    def _shard_size(cls, size: Any) -> int:
        """5_000_000 or '5MB' -> bytes, as transformers reads a max_shard_size."""
        from transformers.utils.hub import convert_file_size_to_int  # seconds to import: not for --help

        try:
            value = size if isinstance(size, int) else convert_file_size_to_int(str(size))
        except ValueError:
            value = 0
        if value <= 0:
            raise ValueError(f"'{size}' is not a size like 5GB or 500MB")
        return value

    @model_validator(mode="after")
    def _calibration_for_calibrated(self) -> ConvertOptions:
        if not METHODS[self.method].calibrates and (self.calibration or self.refine_steps != DEFAULT_REFINE_STEPS
                                                    or self.calibration_tokens != DEFAULT_CALIBRATION_TOKENS):
            raise ValueError("--calibration, --calibration-tokens and --refine-steps apply to --method calibrated only")
        return self
