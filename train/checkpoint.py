"""Checkpoints: accelerate's full training state plus our position, written atomically, newest K kept.

A checkpoint is `checkpoints/step-XXXXXXXX/`: what `Accelerator.save_state` writes (model, optimizer, RNG states
of every process, all read back with weights_only=True) and `trainer_state.json` (step, tokens, data position, the
learning-rate scheduler's state: kept in JSON, as accelerate would unpickle a registered object with
weights_only=False, running whatever code a planted file holds). It is written under a
temporary name, fsynced and renamed when complete, so a crash during a save leaves the previous checkpoints intact
and a half-written one is never resumed from. One torn all the same (written before files were fsynced, or damaged
since) is passed over for the newest whole one, with a warning.
"""

from __future__ import annotations

import json
import logging
import pickle
import shutil
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from accelerate import Accelerator
from safetensors import SafetensorError, safe_open

from gqa_uptrain.cli import warn
from gqa_uptrain.errors import CheckpointError, one_line
from gqa_uptrain.renames import move_into_place

STATE_FILE = "trainer_state.json"
_PREFIX = "step-"
_TEMP_PREFIX = ".incomplete-"
_TORCH_FILES = (".bin", ".pkl", ".pt", ".pth")  # torch.save's zip archives (accelerate's optimizer, RNG states...)
_PLANTED = "custom_checkpoint_"  # pickles load_checkpoint refuses in one line: never taken for a torn file


def checkpoint_dir(root: Path, step: int) -> Path:
    return root / f"{_PREFIX}{step:08d}"


def complete_checkpoints(root: Path) -> list[Path]:
    """Finished checkpoints, oldest first."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.name.startswith(_PREFIX) and (p / STATE_FILE).is_file()]
    return sorted(found, key=lambda p: int(p.name.removeprefix(_PREFIX)))


def latest_checkpoint(root: Path) -> Path | None:
    found = complete_checkpoints(root)
    return found[-1] if found else None


def damage(path: Path) -> str | None:
    """Why a complete checkpoint cannot be resumed from (its first file that is empty, cut short or unreadable), or
    None when it is whole. Only headers and directories are read, the same on every process, so all of a run's
    processes pass over the same checkpoints."""
    try:
        json.loads((path / STATE_FILE).read_text())
    except (OSError, UnicodeDecodeError, ValueError):
        return f"{STATE_FILE} is unreadable"
    for file in sorted(f for f in path.rglob("*") if f.is_file() and not f.name.startswith(_PLANTED)):
        name = file.relative_to(path).as_posix()
        if file.stat().st_size == 0:
            return f"{name} is empty"
        if file.suffix == ".safetensors":
            try:
                with safe_open(file, "pt"):  # checks that the header's tensors cover the file exactly
                    pass
            except (OSError, SafetensorError) as error:
                return f"{name} is torn ({one_line(error)})"
        elif file.suffix in _TORCH_FILES and not zipfile.is_zipfile(file):
            return f"{name} is torn (not a whole torch archive)"
    return None


def resumable_checkpoint(root: Path, is_main_process: bool) -> Path | None:
    """The newest whole checkpoint, after one warning line naming the newer torn ones passed over. None when none is
    whole: the run starts over, as one killed before its first checkpoint does (a torn checkpoint holds nothing to
    keep, and refusing would leave the user nothing to do but delete it)."""
    torn, chosen = [], None
    for path in reversed(complete_checkpoints(root)):
        why = damage(path)
        if why is None:
            chosen = path
            break
        torn.append(f"{path.name} ({why})")
    if torn and is_main_process:
        then = f"resuming from {chosen.name}" if chosen else "starting over from step 0"
        warn("gqa-uptrain", f"{root}: passed over checkpoint(s) that cannot be resumed from: {'; '.join(torn)}; "
                            f"{then}")
    return chosen


class _SharedTensorNote(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "Removed shared tensor" not in record.getMessage()


@contextmanager
def tied_weights_unremarked() -> Iterator[None]:
    """Without accelerate's "Removed shared tensor {'lm_head.weight'} while saving" at every checkpoint.

    accelerate logs it whenever a model ties its LM head to its embeddings: safetensors stores a shared tensor once,
    and loading the state ties it again (the resume tests hold a tied model to that), so nothing is lost.
    """
    source = logging.getLogger("accelerate.utils.other")  # where accelerate's clean_state_dict_for_safetensors logs
    note = _SharedTensorNote()
    source.addFilter(note)
    try:
        yield
    finally:
        source.removeFilter(note)


def save_checkpoint(accelerator: Accelerator, root: Path, state: dict[str, Any], keep: int) -> Path:
    """Write the full training state for `state["step"]`, atomically; then drop all but the newest `keep`."""
    final = checkpoint_dir(root, state["step"])
    temp = root / f"{_TEMP_PREFIX}{final.name}"
    if accelerator.is_main_process:
        for stale in root.glob(f"{_TEMP_PREFIX}*"):  # left by a crash during an earlier save
            shutil.rmtree(stale)
        temp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    try:
        with tied_weights_unremarked():
            accelerator.save_state(str(temp))
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            (temp / STATE_FILE).write_text(json.dumps(state, indent=2) + "\n")
            # every process's files, fsynced; the same step written by a run that died before pruning is replaced
            move_into_place(temp, final, replace=True)
    except BaseException:
        if accelerator.is_main_process:  # a full disk: give back what the half-written checkpoint holds
            shutil.rmtree(temp, ignore_errors=True)
        raise
    if accelerator.is_main_process:
        for old in complete_checkpoints(root)[:-keep]:
            shutil.rmtree(old)
    accelerator.wait_for_everyone()
    return final


def size_bytes(path: Path) -> int:
    """Bytes of the files under `path` (a checkpoint folder)."""
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def load_checkpoint(accelerator: Accelerator, path: Path) -> dict[str, Any]:
    """Restore everything `save_checkpoint` wrote into the prepared objects; return the trainer state."""
    pickles = sorted(p.name for p in path.glob("custom_checkpoint_*.pkl"))
    if pickles:  # accelerate would unpickle it with weights_only=False: whoever wrote it would run code here
        raise CheckpointError(f"cannot resume from {path}: it holds {pickles[0]}, a pickle gqa-uptrain does not read "
                              "(unpickling it could run any code; earlier versions kept the learning-rate schedule "
                              "there): start the run again in a new output_dir")
    try:
        state = json.loads((path / STATE_FILE).read_text())
        accelerator.load_state(str(path))
    except (OSError, ValueError, RuntimeError, KeyError, pickle.UnpicklingError) as error:
        # UnpicklingError: a file that is no plain tensor data (torch.load with weights_only=True runs no code)
        raise CheckpointError(f"cannot resume from {path}: {one_line(error)}") from None
    return state
