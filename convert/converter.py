"""Carry out a plan: stream every tensor into a temporary folder beside the target, then rename it in place.

Nothing half-written is ever left under the output name: any failure (bad shard, full disk, Ctrl-C)
removes the temporary folder, and an existing output is only replaced (with --force) once the new one is
complete.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from tqdm.auto import tqdm

from gqa_uptrain.convert.card import card_license, model_card
from gqa_uptrain.convert.calibration.calibrate import fit_checkpoint
from gqa_uptrain.convert.checkpoint_io import CheckpointReader, ShardedWriter, is_weight_file, write_tensor
from gqa_uptrain.convert.methods import PoolContext
from gqa_uptrain.convert.plan import ConversionPlan, Step
from gqa_uptrain.convert.pooling import pool_tensor, seeded_generator
from gqa_uptrain.source import Source
from gqa_uptrain.errors import DiskFullError, OutputExistsError
from gqa_uptrain.files import sha256_file
from gqa_uptrain.provenance import (PROVENANCE, Conversion, SourceRecord, conversion_record, read_provenance,
                                   write_provenance)

_NOT_COPIED = {"config.json", "README.md", PROVENANCE}
_SPACE_MARGIN = 64 << 20


def check_output(output: Path, source: Path, force: bool) -> None:
    """Refuse to overwrite without --force, and never write into or over the source."""
    resolved, source_resolved = output.resolve(), source.resolve()
    if resolved == source_resolved or source_resolved in resolved.parents:
        raise OutputExistsError(f"{output}: the output must not be the source folder or inside it")
    if output.exists() and not force:
        raise OutputExistsError(f"{output}: already exists (use --force to replace it)")


def default_output(name: str, groups: int) -> Path:
    """./<name>-gqa<G>, or ./<name>-mqa for a single KV head."""
    return Path(f"{name}-mqa" if groups == 1 else f"{name}-gqa{groups}")


def convert(plan: ConversionPlan, source: Source, output: Path, force: bool = False,
            progress: bool = True) -> Path:
    """Write the converted model to `output` and return it."""
    check_output(output, source.folder, force)
    output.parent.mkdir(parents=True, exist_ok=True)
    _check_space(plan, output.parent)
    work = Path(tempfile.mkdtemp(prefix=f".{output.name}.partial-", dir=output.parent))
    work.chmod(0o755)  # mkdtemp makes it private; the finished model folder should not be
    cancel = threading.Event()
    # Source files are hashed for the provenance record beside the conversion, several at a time where cores allow.
    hasher = ThreadPoolExecutor(max(1, (os.cpu_count() or 2) - 1))
    try:
        pending = {file.name: hasher.submit(sha256_file, file, cancel) for file in plan.reader.files}
        fitted, calibration = None, None
        if plan.calibration is not None:
            fitted, calibration = fit_checkpoint(plan, work / ".calibration", progress)
        _write_weights(plan, work, progress, fitted)
        shutil.rmtree(work / ".calibration", ignore_errors=True)
        _copy_other_files(source.folder, work)
        _write_config(plan, work)
        hashes = {name: digest.result() for name, digest in pending.items()}
        source_record: SourceRecord = {"id": source.label, "revision": source.revision,
                                       "license": card_license(source.folder), "sha256": hashes}
        write_provenance(work, conversion_record(source_record, _conversion(plan, calibration),
                                                 read_provenance(source.folder)))
        model_card(work, output.name).save(work / "README.md")
        _flush_to_disk(work)
        _move_into_place(work, output)
    except BaseException:
        cancel.set()
        shutil.rmtree(work, ignore_errors=True)
        raise
    finally:
        hasher.shutdown(cancel_futures=True)
    return output


def _conversion(plan: ConversionPlan, calibration: dict | None) -> Conversion:
    layout = plan.layout
    return {"method": plan.method, "groups": layout.groups, "kv_heads_before": layout.kv_heads,
            "kv_heads_after": layout.groups, "query_heads": layout.query_heads,
            **({"seed": plan.seed} if plan.method in ("random", "calibrated") else {}),
            **({"calibration": calibration} if calibration is not None else {})}


def _write_weights(plan: ConversionPlan, folder: Path, progress: bool, fitted: CheckpointReader | None) -> None:
    init_std = getattr(plan.config, "initializer_range", 0.02)
    with tqdm(total=plan.output_bytes, unit="B", unit_scale=True, unit_divisor=1024, desc="writing weights",
              disable=not progress) as bar, ShardedWriter(folder, plan.shards, bar.update) as writer:
        for step in plan.steps:
            writer.write(_tensor_source(plan, step, init_std, fitted))
        writer.finish()


def _tensor_source(plan: ConversionPlan, step: Step, init_std: float, fitted: CheckpointReader | None):
    """How the writer gets a step's bytes: a raw copy (of the source, or of a calibrated fit), or the pooled
    tensor."""
    reader = plan.reader
    if step.fitted:
        return lambda out, progress: fitted.copy_raw(step.output.name, out, progress)
    if step.change is None:
        return lambda out, progress: reader.copy_raw(step.output.name, out, progress)
    context = PoolContext(step.change.role, seeded_generator(plan.seed, step.output.name), init_std)
    layout = plan.layout
    tensor = pool_tensor(step.change, [reader.read(name) for name in step.sources], layout.kv_heads,
                         layout.groups, plan.method, context)
    return lambda out, progress: write_tensor(out, tensor, progress)


def _copy_other_files(source: Path, folder: Path) -> None:
    """Tokenizer, generation config, chat template, license...: everything but weights and what is rewritten."""
    for path in sorted(source.rglob("*")):
        relative = path.relative_to(source)
        if any(part.startswith(".") for part in relative.parts) or path.is_dir():
            continue
        if is_weight_file(path) or relative.as_posix() in _NOT_COPIED:
            continue
        (folder / relative).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, folder / relative)


def _write_config(plan: ConversionPlan, folder: Path) -> None:
    """The source's config.json, key for key, with the new KV head count."""
    config = {**plan.raw_config, "num_key_value_heads": plan.layout.groups}
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")


def _check_space(plan: ConversionPlan, parent: Path) -> None:
    free = shutil.disk_usage(parent).free
    if free < plan.output_bytes + _SPACE_MARGIN:
        raise DiskFullError(f"{parent}: not enough free disk space ({free / 2**30:.1f} GiB free, the "
                            f"converted weights need {plan.output_bytes / 2**30:.1f} GiB)")


def _flush_to_disk(folder: Path) -> None:
    """fsync every file before the rename, so a crash cannot leave a complete-looking but empty output."""
    for path in folder.rglob("*"):
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


def _move_into_place(work: Path, output: Path) -> None:
    """Rename the finished folder to `output`; an existing output is set aside first and deleted last."""
    old = None
    if output.exists():
        old = output.with_name(f".{output.name}.old-{work.name.rsplit('-', 1)[-1]}")
        output.rename(old)
    work.rename(output)
    if old is not None:
        shutil.rmtree(old)
