"""Checkpoints: accelerate's full training state plus our position, written atomically, newest K kept.

A checkpoint is `checkpoints/step-XXXXXXXX/`: what `Accelerator.save_state` writes (model, optimizer, RNG states
of every process, all read back with weights_only=True) and `trainer_state.json` (step, tokens, data position, the
learning-rate scheduler's state: kept in JSON, as accelerate would unpickle a registered object with
weights_only=False, running whatever code a planted file holds). It is written under a
temporary name and renamed when complete, so a crash during a save leaves the previous checkpoints intact and
a half-written one is never resumed from.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from accelerate import Accelerator

from gqa_uptrain.errors import CheckpointError, one_line

STATE_FILE = "trainer_state.json"
_PREFIX = "step-"
_TEMP_PREFIX = ".incomplete-"


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
    except BaseException:
        if accelerator.is_main_process:  # a full disk: give back what the half-written checkpoint holds
            shutil.rmtree(temp, ignore_errors=True)
        raise
    if accelerator.is_main_process:
        if final.exists():  # the same step written by a run that died before pruning
            shutil.rmtree(final)
        os.replace(temp, final)
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
