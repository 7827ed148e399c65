"""Carry out a plan: stream every tensor into a temporary folder beside the target, then put it in place.

What is promised, and where it is kept:
- the output never destroys what this tool did not write (`check_output`): not the source nor a folder holding it,
  not a home folder or the root, not a file, and with --force only a model folder gqa-convert or gqa-uptrain wrote;
- one writer per output: the run holds `.NAME.lock` beside it (`gqa_uptrain.locks.output_lock`), and a second
  run to the same output is refused while the first lives;
- nothing half-written under the output name: the model is built in `.NAME.partial-*`, fsynced and renamed in place,
  an existing output swapped for it in one step (`gqa_uptrain.renames.move_into_place`), so the old or the new model
  exists at every instant; any failure (bad shard, full disk, Ctrl-C) removes the temporary folder;
- a run killed outright (SIGKILL, power loss) leaves its `.NAME.partial-*`; the next run to the same output removes
  it, and says so (`_clear_leftovers`);
- a calibrated conversion keeps its finished layers in `.NAME.calibration` beside the output, under the same lock
  (`calibration/store.py`): a failure, Ctrl-C or kill leaves it, so that the next run of the same fit resumes at the
  next layer; it is removed once the converted model is in place, and never by `_clear_leftovers`;
- only files inside the source are read or copied (`gqa_uptrain.model_folder`).
"""

from __future__ import annotations

import errno
import json
import os
import pwd
import re
import shutil
import tempfile
from contextlib import suppress
from pathlib import Path

from tqdm.auto import tqdm

from gqa_uptrain.cli import warn
from gqa_uptrain.convert.calibration.store import store_path
from gqa_uptrain.convert.card import card_license, model_card
from gqa_uptrain.convert.checkpoint_reader import CheckpointReader, is_model_file, is_weight_file
from gqa_uptrain.convert.checkpoint_writer import ShardedWriter, copy_tensor, write_tensor
from gqa_uptrain.convert.methods import PoolContext
from gqa_uptrain.convert.output_config import output_config
from gqa_uptrain.convert.plan import ConversionPlan, TensorPlan
from gqa_uptrain.convert.pooling import pool_tensor, seeded_generator
from gqa_uptrain.atomic_write import flush_to_disk
from gqa_uptrain.errors import DiskFullError, OutputError, OutputExistsError, is_full_disk
from gqa_uptrain.hashing import BackgroundHashes
from gqa_uptrain.locks import output_lock
from gqa_uptrain.model_folder import model_root, readable_files
from gqa_uptrain.provenance import (PROVENANCE, Conversion, Provenance, SourceRecord, conversion_record,
                                   read_provenance, why_not_converted_here, write_provenance)
from gqa_uptrain.renames import move_into_place, rename_no_replace
from gqa_uptrain.sizes import human_size
from gqa_uptrain.source import Source

PROG = "gqa-convert"
_NOT_COPIED = {"config.json", "README.md", PROVENANCE}
_SPACE_MARGIN = 64 << 20


def check_output(output: Path, source: Path, force: bool) -> None:
    """Refuse, in one line, an output whose writing could destroy what this tool did not write."""
    target = output.resolve()
    for protected in {source.resolve(), model_root(source)}:
        if target == protected or protected in target.parents:
            raise OutputError(f"{output}: the output must not be the source folder or inside it")
        if target in protected.parents:
            raise OutputError(f"{output}: the output must not be a folder that holds the source ({protected})")
    if target == Path(target.anchor) or _is_home(target):
        raise OutputError(f"{output}: the output must not be the filesystem root or a home folder")
    if output.is_symlink():
        raise OutputError(f"{output}: is a link; name the folder itself, or choose another output")
    if not output.exists():
        return
    if not output.is_dir():
        raise OutputError(f"{output}: is a file, not a model folder; remove it or choose another output")
    if not force:
        raise OutputExistsError(f"{output}: already exists (use --force to replace it)")
    reason = why_not_converted_here(output)
    if reason is not None:
        raise OutputError(f"{output}: --force replaces only a model folder that gqa-convert or gqa-uptrain wrote, "
                          f"and {reason}; remove it yourself or choose another output")


def _is_home(folder: Path) -> bool:
    """The user's home, or a folder that is its owner's home."""
    homes = [os.path.expanduser("~")]
    with suppress(OSError, KeyError):
        homes.append(pwd.getpwuid(folder.stat().st_uid).pw_dir)
    return any(folder == Path(home).resolve() for home in homes if home.startswith("/"))


def default_output(name: str, groups: int) -> Path:
    """./<name>-gqa<G>, or ./<name>-mqa for a single KV head."""
    return Path(f"{name}-mqa" if groups == 1 else f"{name}-gqa{groups}")


def convert(plan: ConversionPlan, source: Source, output: Path, force: bool = False,
            progress: bool = True, hashes: BackgroundHashes | None = None) -> Provenance:
    """Write the converted model to `output`; returns the provenance record written beside it (the caller's result
    holds it, so nothing is read back). `hashes`: the source's weight files being hashed already
    (`convert_checkpoint` starts them before its imports); by default they are hashed from here on."""
    check_output(output, source.folder, force)
    # What is copied besides the weights; a folder whose provenance record links out of it is refused here.
    others = [name for name in readable_files(source.folder, is_model_file, PROG, "copied")
              if not is_weight_file(Path(name)) and name not in _NOT_COPIED]
    target = Path(os.path.abspath(output))  # "." and ".." get a name, for the lock and temporary folder beside it
    _make_parent(target.parent)
    with output_lock(target, PROG) as lock:
        if not lock.flocked:
            warn(PROG, f"{target.parent}: this file system cannot lock files, so a second run that starts writing "
                       f"{target.name} at the same moment would go unnoticed")
        _clear_leftovers(target, lock.flocked)
        check_output(target, source.folder, force)  # again: another run may have written it before we locked it
        _check_space(plan, target.parent)
        try:
            return _write(plan, source, others, target, force, progress, hashes)
        except OSError as e:
            if not is_full_disk(e):
                raise
            raise _filled_up(plan, target.parent) from None


def _write(plan: ConversionPlan, source: Source, others: list[str], output: Path, force: bool,
           progress: bool, hashes: BackgroundHashes | None) -> Provenance:
    work = Path(tempfile.mkdtemp(prefix=f".{output.name}.partial-", dir=output.parent))
    work.chmod(0o755)  # mkdtemp makes it private; the finished model folder should not be
    # The source files are hashed for the provenance record by other processes, beside the conversion.
    with hashes or BackgroundHashes(plan.reader.files) as hashing:
        try:
            record = _write_into(work, output.name, plan, source, others, progress, hashing)
            check_output(output, source.folder, force)
            _move_into_place(work, output, force)
        except BaseException:
            shutil.rmtree(work, ignore_errors=True)
            raise
    if plan.fitted:
        shutil.rmtree(store_path(output), ignore_errors=True)  # its layers are in the model now
    return record


def _write_into(work: Path, title: str, plan: ConversionPlan, source: Source, others: list[str], progress: bool,
                hashing: BackgroundHashes) -> Provenance:
    """Every file of the converted model `title`, on disk (fsynced), in the temporary folder `work`; returns the
    provenance record written."""
    fitted, calibration = None, None
    if plan.fitted:
        from gqa_uptrain.convert.calibration.calibrate import fit_checkpoint  # datasets, tokenizers: only for this

        fitted, calibration = fit_checkpoint(plan, store_path(work.parent / title), progress)
    _write_weights(plan, work, progress, fitted)
    for name in others:  # tokenizer, generation config, chat template, license...
        (work / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source.folder / name, work / name)
    _write_config(plan, work)
    flush_to_disk(work.rglob("*"))  # the weights go to disk while the last source files are hashed (not at the end)
    digests = hashing.results()
    source_record: SourceRecord = {"id": source.label, "revision": source.revision,
                                   "license": card_license(source.folder),
                                   "sha256": {file.name: digests[file] for file in plan.reader.files}}
    record = conversion_record(source_record, _conversion(plan, calibration), read_provenance(source.folder))
    write_provenance(work, record)
    model_card(work, title).save(work / "README.md")
    return record


def _make_parent(parent: Path) -> None:
    """Create the output's parent folder; one this user cannot write into is refused in one line."""
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        if e.errno not in (errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOTDIR, errno.EEXIST):
            raise
        raise OutputError(f"{parent}: cannot create the output's folder ({e.strerror})") from None
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputError(f"{parent}: cannot write there (no permission, or a read-only file system)")


def _clear_leftovers(output: Path, locked: bool) -> None:
    """Deal with what killed runs to this output left beside it; one line each. Holding the output's lock, we know
    their writers are gone: a folder that --force had set aside is put back where the output is missing (a crash
    between the two renames on a file system that cannot swap), everything else is removed. Without the lock they
    may be a live run's, so they are only pointed at."""
    pattern = re.compile(rf"\.{re.escape(output.name)}\.(partial|old)-[a-z0-9_]{{8}}")  # mkdtemp's 8 characters
    for path in sorted(output.parent.iterdir()):
        match = pattern.fullmatch(path.name)
        if match is None or path.is_symlink() or not path.is_dir():
            continue
        size = human_size(sum(file.lstat().st_size for file in path.rglob("*")))
        if not locked:
            warn(PROG, f"{path} ({size}) is left by an interrupted run, or is another run's; not removed "
                       "without a lock: remove it yourself once no run is writing")
        elif match[1] == "old" and not os.path.lexists(output):
            rename_no_replace(path, output)
            warn(PROG, f"{output} put back from {path.name}, where an interrupted --force had set it aside")
        else:
            shutil.rmtree(path)
            warn(PROG, f"removed {path} ({size}), left by an interrupted run")


def _conversion(plan: ConversionPlan, calibration: dict | None) -> Conversion:
    layout = plan.layout
    return {**plan.method.record(plan.options.seed), "groups": layout.groups, "kv_heads_before": layout.kv_heads,
            "kv_heads_after": layout.groups, "query_heads": layout.query_heads,
            **({"calibration": calibration} if calibration is not None else {})}


def _write_weights(plan: ConversionPlan, folder: Path, progress: bool, fitted: CheckpointReader | None) -> None:
    init_std = getattr(plan.config, "initializer_range", 0.02)
    with tqdm(total=plan.output_bytes, unit="B", unit_scale=True, unit_divisor=1024, desc="writing weights",
              disable=not progress) as bar, ShardedWriter(folder, plan.shards, bar.update) as writer:
        for step in plan.steps:
            writer.write(_tensor_source(plan, step, init_std, fitted))
        writer.finish()


def _tensor_source(plan: ConversionPlan, step: TensorPlan, init_std: float, fitted: CheckpointReader | None):
    """How the writer gets a step's bytes: a raw copy (of the source, or of a calibrated fit), or the pooled
    tensor."""
    reader = plan.reader
    if step.fitted:
        return lambda out, progress: copy_tensor(fitted, step.output.name, out, progress)
    if step.change is None:
        return lambda out, progress: copy_tensor(reader, step.output.name, out, progress)
    context = PoolContext(step.change.role, seeded_generator(plan.options.seed, step.output.name), init_std)
    layout = plan.layout
    tensor = pool_tensor(step.change, [reader.read(name) for name in step.sources], layout.kv_heads,
                         layout.groups, plan.method.pool, context)
    return lambda out, progress: write_tensor(out, tensor, progress)


def _write_config(plan: ConversionPlan, folder: Path) -> None:
    """The source's config.json, key for key, with the new KV head count."""
    config = output_config(plan)
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")


def _check_space(plan: ConversionPlan, parent: Path) -> None:
    free, need = shutil.disk_usage(parent).free, plan.output_bytes + _SPACE_MARGIN
    if free < need:
        raise DiskFullError(f"{parent}: not enough free disk space ({human_size(free)} free, the converted model "
                            f"needs {human_size(need)} with a margin); free {human_size(need - free)} or choose "
                            "another output")


def _filled_up(plan: ConversionPlan, parent: Path) -> DiskFullError:
    """The disk filled while the model was written (another program took the space after _check_space): what to
    free, measured once the partial folder is gone."""
    free, need = shutil.disk_usage(parent).free, plan.output_bytes + _SPACE_MARGIN
    then = (f"free {human_size(need - free)} or choose another output" if free < need
            else "there is room again: run the same command again")
    return DiskFullError(f"disk full while writing the converted model in {parent}, and nothing of it was kept "
                         f"({human_size(free)} free now, the model needs {human_size(need)} with a margin); {then}")


def _move_into_place(work: Path, output: Path, replace: bool) -> None:
    """`move_into_place`, with one line for an output another program created while this run wrote it. A `.NAME.old-*`
    that a crash left between its two renames (on a file system that cannot swap) is put back by the next run
    (`_clear_leftovers`)."""
    try:
        move_into_place(work, output, replace)
    except FileExistsError:
        raise OutputExistsError(f"{output}: was created by another program while this run wrote it; the new "
                                "model was not kept") from None
