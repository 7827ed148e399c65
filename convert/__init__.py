"""Convert a Hugging Face checkpoint to fewer KV heads (`gqa-convert`), one tensor at a time.

Where things happen: `gqa_uptrain.source` finds the files (`hub_headers.py` reads only a Hub model's config and
safetensors headers, for a dry run), `layout.py` finds which tensors hold KV heads (on a
model built on the meta device, `gqa_uptrain.kv_heads`), `plan.py` decides every output tensor (`ConversionPlan`),
`pooling.py` pools one tensor with a method from `methods/` (`METHODS` is the one list of them), `calibration/`
fits whole attention layers for `--method calibrated` (the fitted tensors are streamed like pooled ones),
`checkpoint_reader.py` reads a checkpoint lazily and `checkpoint_writer.py` streams the output shards,
`converter.py` runs the plan atomically, and `card.py` writes the model card from the provenance record
(`gqa_uptrain.provenance`).

`convert_checkpoint` is the Python API; `gqa-convert` (cli.py) only parses flags and calls it. The door is
`__all__`: apps use nothing else (tests/test_layout.py); its names that live in modules importing torch or
transformers are imported when first used, so that `gqa-convert --help` stays fast.
"""

from __future__ import annotations

from contextlib import nullcontext
from importlib import import_module
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from gqa_uptrain.errors import ConfigError, GqaError
from gqa_uptrain.hashing import BackgroundHashes
from gqa_uptrain.paths import expand_home

if TYPE_CHECKING:
    from gqa_uptrain.convert.calibration.data import stdlib_docstrings
    from gqa_uptrain.convert.card import is_generated_card, model_card
    from gqa_uptrain.convert.checkpoint_reader import CheckpointReader, is_model_file
    from gqa_uptrain.convert.methods import METHODS

__all__ = ["convert_checkpoint", "METHODS", "model_card", "is_generated_card", "is_model_file", "stdlib_docstrings"]
# The door's names defined in other modules -> that module, imported on first use (PEP 562). stdlib_docstrings is
# the calibration text that every Python carries, which gqa-demo also trains on.
_ELSEWHERE = {"METHODS": "methods", "model_card": "card", "is_generated_card": "card",
              "is_model_file": "checkpoint_reader", "stdlib_docstrings": "calibration.data"}


def __getattr__(name: str) -> Any:
    if name not in _ELSEWHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(import_module(f"{__name__}.{_ELSEWHERE[name]}"), name)

DEFAULT_CALIBRATION_TOKENS = 32_768
DEFAULT_REFINE_STEPS = 200
MAX_SEED = 2**32 - 1  # as numpy's; torch's generators take seed * 1_000_003 + a name's CRC (pooling.py) below 2**64


def convert_checkpoint(source: str | Path, groups: int, output: str | Path | None = None, *, method: str = "mean",
                       seed: int = 0, revision: str | None = None, max_shard_bytes: int | str = 5_000_000_000,
                       force: bool = False, progress: bool = True, calibration: str | None = None,
                       calibration_tokens: int = DEFAULT_CALIBRATION_TOKENS,
                       refine_steps: int = DEFAULT_REFINE_STEPS, dry_run: bool = False,
                       context: int = 4096, say: Callable[[str], None] | None = print) -> Path:
    """Convert `source` (folder or Hub id) to `groups` KV heads; returns the output folder.

    Every `gqa-convert` flag is an argument: `method` (mean, first, random, calibrated), `calibration`,
    `calibration_tokens` and `refine_steps` (the calibrated method's text, None: the default, its size, and the
    most gradient steps per layer after the closed form, 0: none), `seed`, `revision`,
    `max_shard_bytes` (bytes, or a size such as "500MB"), `force`. With `dry_run` nothing is written: the plan
    (KV-cache bytes at `context` tokens) goes to `say` and the folder it would write is returned; a Hub id is planned
    from its config and safetensors headers, without downloading its weights. After writing,
    `say` gets the line that says how to measure the damage. Mistakes raise `gqa_uptrain.errors` classes.
    """
    shard_bytes = _max_shard_bytes(max_shard_bytes)
    if method != "calibrated" and (calibration or calibration_tokens != DEFAULT_CALIBRATION_TOKENS
                                   or refine_steps != DEFAULT_REFINE_STEPS):
        raise GqaError("--calibration, --calibration-tokens and --refine-steps apply to --method calibrated only")
    if calibration_tokens < 1:
        raise GqaError(f"--calibration-tokens must be positive, got {calibration_tokens}")
    if refine_steps < 0:
        raise GqaError(f"--refine-steps must be 0 (no refinement) or more, got {refine_steps}")
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= MAX_SEED:
        raise ConfigError(f"--seed must be a whole number from 0 to {MAX_SEED:,}, got {seed!r}")
    from gqa_uptrain.convert.hub_headers import hub_checkpoint, plans_from_hub
    from gqa_uptrain.source import resolve_source  # huggingface_hub: not for `gqa-convert --help`

    if dry_run and plans_from_hub(str(source)):  # headers by range requests: no weights downloaded
        resolved, reader = hub_checkpoint(str(source), revision)
    else:
        resolved = resolve_source(str(source), revision)
        reader = None if dry_run else _early_reader(resolved.folder)
    # The weight files are hashed for the provenance record from here on, by other processes, while this one imports
    # transformers' model classes and plans: most of a small conversion's time, and much of a large one's.
    with BackgroundHashes(reader.files) if reader is not None and not dry_run else nullcontext() as hashes:
        from gqa_uptrain.convert.converter import convert, default_output
        from gqa_uptrain.convert.plan import (CalibrationOptions, after_writing, build_plan, check_calibration_memory,
                                              describe, refuse_no_op)

        plan = build_plan(resolved.folder, groups, method, seed, shard_bytes,
                          CalibrationOptions(calibration, calibration_tokens, refine_steps), reader)
        refuse_no_op(plan)
        check_calibration_memory(plan)
        target = expand_home(Path(output)) if output is not None else default_output(resolved.name, groups)
        say = say or (lambda line: None)
        if dry_run:
            say("\n".join([*describe(plan, context), f"output        {target} (not written: --dry-run)"]))
            return target
        written = convert(plan, resolved, target, force=force, progress=progress, hashes=hashes)
    say("\n".join([f"gqa-convert: wrote {written} ({plan.layout.kv_heads} -> {plan.layout.groups} KV heads, "
                   f"{plan.method})", *after_writing(plan, str(source), written)]))
    return written


def _early_reader(folder: Path) -> CheckpointReader | None:
    """The checkpoint's headers, read before the heavy imports so that its files can be hashed beside them; None when
    they cannot be read: the plan then says why, in its own order (a missing config.json first)."""
    from gqa_uptrain.convert.checkpoint_reader import CheckpointReader

    try:
        return CheckpointReader(folder)
    except (GqaError, OSError):
        return None


def _max_shard_bytes(size: int | str) -> int:
    """5_000_000 or '5MB' -> bytes; GqaError for anything else."""
    from transformers.utils.hub import convert_file_size_to_int

    try:
        value = size if isinstance(size, int) else convert_file_size_to_int(str(size))
    except ValueError:
        value = 0
    if value <= 0:
        raise GqaError(f"--max-shard-size: '{size}' is not a size like 5GB or 500MB")
    return value
