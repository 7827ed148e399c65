"""A full disk during a run, told as one line: which folder to free, and how much the next checkpoint needs.

A full disk shows up in many forms: OSError ENOSPC (or EDQUOT, a quota) from Python's own writes, a safetensors
error whose text says "No space left on device (os error 28)", and torch.save's bare RuntimeError from its zip
writer ("file write failed", "unexpected pos ..."), which says nothing of the disk: that one counts only when the
output's file system is indeed nearly full. Nothing half-written is resumed from (checkpoints are renamed into
place when complete, metrics.jsonl lines are whole), so after freeing space the same command resumes.
"""

from __future__ import annotations

import shutil
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from collections.abc import Iterator

import torch
from accelerate import Accelerator

from gqa_uptrain.errors import DiskFullError, is_full_disk
from gqa_uptrain.sizes import human_size

from . import checkpoint

_FULL_TEXTS = ("No space left on device", "os error 28", "Disk quota exceeded", "StorageFull")
_TORCH_WRITER_TEXTS = ("file write failed", "unexpected pos", "PytorchStreamWriter")
_NEARLY_FULL = 1 << 30  # bytes free under which torch's mute writer errors are taken for a full disk


@dataclass
class Space:
    """What the message needs to know, filled in as the run learns it."""

    output: Path
    checkpoint_bytes: int | None = None  # an estimate until a checkpoint exists: fp32 weights + AdamW moments
    keep: int = 1


def is_disk_full(error: BaseException, folder: Path, need: int | None = None) -> bool:
    """Whether `error` (or what caused it) is a full disk or quota while writing under `folder`, where `need` bytes
    were being written (torch's mute writer errors count when less than that is free: a failed checkpoint is
    deleted before this is asked, which frees what it had written)."""
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if is_full_disk(error):
            return True
        text = str(error)
        if any(marker in text for marker in _FULL_TEXTS):
            return True
        if isinstance(error, RuntimeError) and any(marker in text for marker in _TORCH_WRITER_TEXTS):
            return _free_bytes(folder) < max(need or 0, _NEARLY_FULL)
        error = error.__cause__ or error.__context__
    return False


def full_disk_message(space: Space) -> str:
    """One line: where space ran out, what is free, what to free and how much the next checkpoint needs."""
    output = space.output
    free = _free_bytes(output)
    latest = checkpoint.latest_checkpoint(output / "checkpoints")
    measured = checkpoint.size_bytes(latest) if latest is not None else None
    need = measured or space.checkpoint_bytes
    parts = [f"disk full while writing the run in {output} ({human_size(free)} free on its file system)"]
    if need is not None:
        what = f"the size of {latest.name}" if measured else "weights and AdamW state in fp32"
        kept = f"; with checkpoint.keep={space.keep}, {space.keep + 1} exist while it is written" if latest else ""
        parts.append(f"the next checkpoint needs about {human_size(need)} ({what}{kept})")
    parts.append("free space there (old runs, the Hugging Face and datasets caches) and run the same command "
                 "again: it resumes from the newest checkpoint")
    return "; ".join(parts)


def checkpoint_need(space: Space) -> int | None:
    """Bytes the next checkpoint will take: the newest one's size, else the estimate, else unknown."""
    latest = checkpoint.latest_checkpoint(space.output / "checkpoints")
    return checkpoint.size_bytes(latest) if latest is not None else space.checkpoint_bytes


def check_room(space: Space, accelerator: Accelerator) -> None:
    """Refuse in one line, before a checkpoint is written, if its file system cannot hold it, rather than fail
    tens of gigabytes into the write (the newest checkpoint is deleted only once the new one is complete).

    Every process asks its own file system (nodes may have their own disks) and all stop if one lacks room:
    a process that stopped alone would leave the others waiting in the checkpoint's collectives.
    """
    need = checkpoint_need(space)
    short = need is not None and _free_bytes(space.output) < need
    if accelerator.reduce(torch.tensor(float(short), device=accelerator.device), "max").item():
        raise DiskFullError(full_disk_message(space))


@contextmanager
def explained(space: Space) -> Iterator[None]:
    """Turn a full disk inside the block into one DiskFullError line; every other error passes unchanged."""
    try:
        yield
    except DiskFullError:
        raise
    except Exception as error:
        if not is_disk_full(error, space.output, checkpoint_need(space)):
            raise
        raise DiskFullError(full_disk_message(space)) from error


def _free_bytes(folder: Path) -> int:
    for candidate in (folder, *folder.parents):
        if candidate.exists():
            return shutil.disk_usage(candidate).free
    return 0


