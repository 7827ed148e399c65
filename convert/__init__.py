"""Convert a Hugging Face checkpoint to fewer KV heads (`gqa-convert`), one tensor at a time.

Where things happen: `options.py` holds every setting (`ConvertOptions`, from which cli.py makes the flags),
`gqa_uptrain.source` finds the files (`hub_headers.py` reads only a Hub model's config and safetensors headers, for a
dry run), `source_config.py` reads and checks the source's config.json, `layout.py` finds which tensors hold KV
heads (on a model built on the meta device, `gqa_uptrain.kv_heads`), `checkpoint_names.py` maps the checkpoint's
tensor names to the model's as transformers loads them, `plan.py` decides every output tensor (`ConversionPlan`) and
refuses what would fail later, `output_config.py` makes the config.json written, `messages.py` says what the dry run
and the run tell the user, `pooling.py` pools one tensor with a method from `methods/` (`METHODS` is the one list of
them; each method says what it changes and records), `calibration/` fits whole attention layers for `--method
calibrated` (the fitted tensors are streamed like pooled ones), `checkpoint_reader.py` reads a checkpoint lazily and
`checkpoint_writer.py` streams the output shards, `converter.py` runs the plan atomically, and `card.py` writes the
model card from the provenance record (`gqa_uptrain.provenance`).

`convert_checkpoint` is the Python API (it returns a `ConversionResult`, result.py); `gqa-convert` (cli.py) only
parses flags and calls it. The door is `__all__`: apps use nothing else (tests/test_layout.py); its names that live
in modules importing torch or transformers are imported when first used, so that `gqa-convert --help` stays fast.
"""

from __future__ import annotations

from contextlib import nullcontext
from importlib import import_module
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

# The calibration defaults are importable from here too: the studies and benchmarks in scripts/ start from them.
from gqa_uptrain.convert.options import DEFAULT_CALIBRATION_TOKENS, DEFAULT_REFINE_STEPS, ConvertOptions  # noqa: F401
from gqa_uptrain.convert.result import ConversionResult
from gqa_uptrain.errors import GqaError
from gqa_uptrain.hashing import BackgroundHashes

if TYPE_CHECKING:
    from gqa_uptrain.convert.calibration.data import stdlib_docstrings
    from gqa_uptrain.convert.card import is_generated_card, model_card
    from gqa_uptrain.convert.checkpoint_reader import CheckpointReader, is_model_file
    from gqa_uptrain.convert.methods import METHODS

__all__ = ["convert_checkpoint", "check_options", "ConversionResult", "METHODS", "model_card", "is_generated_card",
           "is_model_file", "stdlib_docstrings"]
# The door's names defined in other modules -> that module, imported on first use (PEP 562). stdlib_docstrings is
# the calibration text that every Python carries, which gqa-demo also trains on.
_ELSEWHERE = {"METHODS": "methods", "model_card": "card", "is_generated_card": "card",
              "is_model_file": "checkpoint_reader", "stdlib_docstrings": "calibration.data"}


def __getattr__(name: str) -> Any:
    if name not in _ELSEWHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(import_module(f"{__name__}.{_ELSEWHERE[name]}"), name)


def check_options(source: str | Path, groups: int, **options: Any) -> None:
    """The checks `convert_checkpoint` runs on its options before it reads anything, for a caller that plans a
    conversion ahead of the steps before it (gqa-pipeline). `options` are `convert_checkpoint`'s; each bad value
    raises one ConfigError, worded as gqa-convert's flags."""
    ConvertOptions(source=source, groups=groups, **options)


def convert_checkpoint(source: str | Path, groups: int, output: str | Path | None = None, *, progress: bool = True,
                       say: Callable[[str], None] | None = print, **options: Any) -> ConversionResult:
    """Convert `source` (folder or Hub id) to `groups` KV heads; returns the output folder, the KV heads before and
    after, the method and the provenance record written (`ConversionResult`).

    `options` are gqa-convert's other flags as keyword arguments, named as `ConvertOptions`' fields (options.py):
    method="calibrated", calibration="books.jsonl", calibration_tokens=..., refine_steps=..., seed, revision,
    max_shard_bytes (bytes, or a size such as "500MB"), force, dry_run, context. With `dry_run` nothing is written:
    the plan (KV-cache bytes at `context` tokens) goes to `say`, and the result names the folder it would write and
    holds no record (its `dry_run` is true); a Hub id is planned from its config and safetensors headers, without
    downloading its weights. After writing, `say` gets the line that says how to measure the damage. Mistakes raise
    `gqa_uptrain.errors` classes.
    """
    settings = ConvertOptions(source=source, groups=groups, output=output, **options)
    from gqa_uptrain.convert.hub_headers import hub_checkpoint, plans_from_hub
    from gqa_uptrain.source import resolve_source  # huggingface_hub: not for `gqa-convert --help`

    dry_run = settings.dry_run
    if dry_run and plans_from_hub(settings.source):  # headers by range requests: no weights downloaded
        resolved, reader = hub_checkpoint(settings.source, settings.revision)
    else:
        resolved = resolve_source(settings.source, settings.revision)
        reader = None if dry_run else _early_reader(resolved.folder)
    # The weight files are hashed for the provenance record from here on, by other processes, while this one imports
    # transformers' model classes and plans: most of a small conversion's time, and much of a large one's.
    with BackgroundHashes(reader.files) if reader is not None and not dry_run else nullcontext() as hashes:
        from gqa_uptrain.convert.converter import convert, default_output
        from gqa_uptrain.convert.messages import after_writing, describe
        from gqa_uptrain.convert.plan import build_plan, check_calibration_memory, refuse_no_op

        plan = build_plan(resolved.folder, settings, reader)
        refuse_no_op(plan)
        check_calibration_memory(plan)
        target = settings.output or default_output(resolved.name, settings.groups)
        say = say or (lambda line: None)
        if dry_run:
            say("\n".join([*describe(plan, settings.context), f"output        {target} (not written: --dry-run)"]))
            return ConversionResult(target, plan.method.name, plan.layout.kv_heads, plan.layout.groups, None)
        record = convert(plan, resolved, target, force=settings.force, progress=progress, hashes=hashes)
    say("\n".join([f"gqa-convert: wrote {target} ({plan.layout.kv_heads} -> {plan.layout.groups} KV heads, "
                   f"{plan.method.name})", *after_writing(plan, settings.source, target, record)]))
    return ConversionResult(target, plan.method.name, plan.layout.kv_heads, plan.layout.groups, record)


def _early_reader(folder: Path) -> CheckpointReader | None:
    """The checkpoint's headers, read before the heavy imports so that its files can be hashed beside them; None when
    they cannot be read: the plan then says why, in its own order (a missing config.json first)."""
    from gqa_uptrain.convert.checkpoint_reader import CheckpointReader

    try:
        return CheckpointReader(folder)
    except (GqaError, OSError):
        return None
