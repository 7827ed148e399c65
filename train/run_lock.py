"""One live run per output folder: `output_dir/gqa-uptrain.lock`, held by the main process for the whole run.

The lock is the base's `gqa_uptrain.locks.output_lock`, gqa-convert's too: an flock that the kernel releases when
its holder exits, crashes or is killed, on a file that names the holder for the one-line refusal a second run gets
(and, where the file system cannot flock, decides by whether the holder still runs). What is the run's own: the
refusal reaches every process, a dead run's record is taken over with one warning, and a folder made for the lock
alone goes with it.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack, contextmanager, suppress
from pathlib import Path

from accelerate import PartialState
from accelerate.utils import broadcast_object_list
from gqa_uptrain import locks
from gqa_uptrain.cli import warn
from gqa_uptrain.errors import OutputBusyError

PROG = "gqa-uptrain"
LOCK_FILE = "gqa-uptrain.lock"


@contextmanager
def hold(output: Path, state: PartialState) -> Iterator[None]:
    """Hold the output folder's lock for the block (main process); every process raises OutputBusyError, with
    the holder named, when another live run holds it. A folder made for the lock alone goes with it (a run that
    stops at a bad input leaves nothing behind)."""
    refusal, created = None, not output.exists()
    with ExitStack() as stack:
        if state.is_main_process:
            if created:
                stack.callback(_remove_if_empty, output)  # after the lock is released (callbacks run last first)
            try:
                stack.enter_context(taken(output))
            except OutputBusyError as error:
                refusal = str(error)
        if state.num_processes > 1:  # every process stops, not only the main one
            refusal = broadcast_object_list([refusal], from_process=0)[0]
        if refusal is not None:
            raise OutputBusyError(refusal)
        yield


@contextmanager
def taken(output: Path) -> Iterator[locks.Held]:
    """The lock of `output` (created if need be) for the block, with one warning when a dead run's record was left
    in it."""
    output.mkdir(parents=True, exist_ok=True)
    with locks.output_lock(output, PROG, output / LOCK_FILE, "output_dir") as lock:
        if lock.previous:
            warn(PROG, f"{output}: the run that held {LOCK_FILE} ({locks.describe_holder(lock.previous)}) is gone; "
                       "taking over its output folder")
        yield lock


def holder(output: Path) -> dict | None:
    """Who the lock file names (the live holder, or a dead one's leftovers); None without a readable one."""
    return locks.holder(output / LOCK_FILE)


def _remove_if_empty(folder: Path) -> None:
    with suppress(OSError):  # not empty: the run wrote something
        folder.rmdir()
