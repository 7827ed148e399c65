"""One live run per output folder: `output_dir/gqa-uptrain.lock`, held by the main process for the whole run.

The lock is the base's (`gqa_uptrain.locks`): an flock that the kernel releases when its holder exits, crashes or
is killed, on a file that names the holder for the one-line refusal a second run gets (and, where the file system
cannot flock, decides by whether the holder still runs). What is the run's own: the refusal reaches every process,
a dead run's record is taken over with one warning, and a folder made for the lock alone goes with it.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager, suppress
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
    fd, refusal, created = None, None, not output.exists()
    if state.is_main_process:
        try:
            fd = acquire(output)
        except OutputBusyError as error:
            refusal = str(error)
    if state.num_processes > 1:  # every process stops, not only the main one
        refusal = broadcast_object_list([refusal], from_process=0)[0]
    if refusal is not None:
        raise OutputBusyError(refusal)
    try:
        yield
    finally:
        if fd is not None:
            release(output, fd)
            if created:
                with suppress(OSError):  # not empty: the run wrote something
                    output.rmdir()


def acquire(output: Path) -> int:
    """Take the lock of `output` (created if need be), with one warning when a dead run's record was left in it;
    return the lock file's descriptor."""
    output.mkdir(parents=True, exist_ok=True)
    lock = locks.acquire(output / LOCK_FILE, PROG, lambda record: _busy(output, record))
    if lock.previous:
        warn(PROG, f"{output}: the run that held {LOCK_FILE} ({_describe(lock.previous)}) is gone; taking over its "
             "output folder")
    return lock.fd


def release(output: Path, fd: int) -> None:
    """Give the lock of `output` back, its file removed."""
    locks.release(output / LOCK_FILE, fd)


def holder(output: Path) -> dict | None:
    """Who the lock file names (the live holder, or a dead one's leftovers); None without a readable one."""
    return locks.holder(output / LOCK_FILE)


def _describe(record: dict) -> str:
    if not record.get("pid"):
        return "a process it does not name"
    return f"pid {record['pid']} on {record.get('host', '?')}, started {record.get('started', '?')}"


def _busy(output: Path, record: dict) -> str:
    return (f"output_dir {output} is in use by another gqa-uptrain run ({_describe(record)}; lock "
            f"{output / LOCK_FILE}): wait for it to end or stop it, or choose another output_dir")
