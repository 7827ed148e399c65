"""An exclusive lock on an output: an flock on a file that names its holder; `output_lock` is every tool's way to take
one.

The kernel releases an flock when its holder exits, crashes or is killed (kill -9 included), so a dead holder never
keeps the output: the file it leaves behind blocks nothing. The file holds a JSON record of its holder (owner,
host, pid, start time, command) for the one-line refusal another process gets; a record found by a process that
did get the lock is a dead holder's leftovers, handed to the caller to mention. Where the file system cannot flock
(some network mounts), the record alone decides: a holder on this host whose process is gone (or whose pid now
names another process) is dead; a holder on another host is taken to be alive. The holder removes the file on
release, while still holding it.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import stat
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import NamedTuple

from gqa_uptrain.errors import OutputBusyError, OutputError

# What flock answers on a file system that cannot lock (Lustre without -o flock, some NFS setups).
_NO_FLOCK = {errno.ENOLCK, errno.EINVAL, errno.EOPNOTSUPP, errno.ENOSYS}


class Held(NamedTuple):
    """A held lock: its file's descriptor; whether the kernel holds it (False on a file system that cannot flock,
    where only the record kept others out); what a dead holder left in the file (None when nothing named one)."""

    fd: int
    flocked: bool
    previous: dict | None


def acquire(path: Path, owner: str, busy: Callable[[dict], str]) -> Held:
    """Take the lock at `path` (the file created if need be, never through a link) and write this process's
    record into it. A live holder: OutputBusyError with `busy(its record)` as the message (`{}` when the file does
    not say who holds it); `busy` says what is locked and what to do, on one line."""
    while True:
        fd = _open_lock_file(path)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            flocked = True
        except BlockingIOError:
            record = _read(fd)
            os.close(fd)
            raise OutputBusyError(busy(record or {})) from None
        except OSError as error:
            if error.errno not in _NO_FLOCK:
                os.close(fd)
                raise
            flocked = False
        if _same_file(fd, path):
            break
        os.close(fd)  # its holder removed the file between our open and our lock: lock the one there now
    previous = _read(fd)
    if previous and not flocked and _alive(previous):
        os.close(fd)
        raise OutputBusyError(busy(previous))
    os.ftruncate(fd, 0)
    os.pwrite(fd, (json.dumps(_record(owner)) + "\n").encode(), 0)
    return Held(fd, flocked, previous or None)


def _open_lock_file(path: Path) -> int:
    """The lock file, opened (created if need be) without following a link and without blocking on a named pipe;
    OutputError, naming what is there, when that is not a regular file: a lock cannot be held through it, and
    what is there is not ours to remove."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK, 0o644)
    except OSError as error:
        if error.errno not in (errno.ELOOP, errno.EISDIR):
            raise
        raise OutputError(_wrong_kind(path, os.lstat(path).st_mode)) from None
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        raise OutputError(_wrong_kind(path, mode))
    return fd


def _wrong_kind(path: Path, mode: int) -> str:
    kinds = {stat.S_ISLNK: "a link", stat.S_ISDIR: "a folder", stat.S_ISFIFO: "a named pipe",
             stat.S_ISSOCK: "a socket"}
    kind = next((name for test, name in kinds.items() if test(mode)), "not a regular file")
    return (f"{path}: the lock file is {kind}, so the output cannot be locked; remove it (no gqa command makes one) "
            "and run the same command again")


def release(path: Path, fd: int) -> None:
    """Remove the lock file while still holding it (nobody can then lock a file the name no longer points at)."""
    try:
        Path(path).unlink(missing_ok=True)  # (gone only where nothing locks: another process removed it)
    finally:
        os.close(fd)


@contextmanager
def held(path: Path, owner: str, busy: Callable[[dict], str]) -> Iterator[Held]:
    """`acquire` for the block, `release` after it."""
    lock = acquire(path, owner, busy)
    try:
        yield lock
    finally:
        release(path, lock.fd)


def lock_beside(output: Path) -> Path:
    """The lock file of an output that is renamed into place as a whole (a converted model): `.NAME.lock` beside
    it."""
    return output.with_name(f".{output.name}.lock")


def describe_holder(record: dict) -> str:
    """Who holds a lock (or held it and died), as a one-line message names them."""
    if not record.get("pid"):
        return "another process"
    return (f"{record.get('owner', 'a process')} (pid {record['pid']} on {record.get('host', '?')}, "
            f"started {record.get('started', '?')})")


@contextmanager
def output_lock(output: Path, owner: str, lock_file: Path | None = None,
                what: str | None = None) -> Iterator[Held]:
    """Hold the lock of `output` for the block (`lock_file`, `lock_beside(output)` by default), or raise
    OutputBusyError naming the live process that holds it; `what`, where the user knows the output by a setting's
    name (e.g. "output_dir"), names it in that message. The lock's `flocked` is False on a file system that cannot lock (some network mounts), where
    only the holder's record keeps another writer out, and one that starts at the same instant goes unnoticed."""
    path = lock_file or lock_beside(output)

    def busy(record: dict) -> str:
        return (f"{what + ' ' if what else ''}{output}: {describe_holder(record)} is writing it now (lock {path}); "
                f"wait for it to end, or choose another {what or 'output'}")

    with held(path, owner, busy) as lock:
        yield lock


def holder(path: Path) -> dict | None:
    """Whom the lock file names (the live holder, or a dead one's leftovers); None without a readable one."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        return _read(fd)
    finally:
        os.close(fd)


def process_start(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (Linux), which tells a reused pid from the holder."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[19])


def _record(owner: str) -> dict:
    return {
        "owner": owner,
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "started": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC"),
        "process_start": process_start(os.getpid()),
        "command": " ".join(sys.argv),
    }


def _read(fd: int) -> dict | None:
    """The lock's record, or None when empty; content that is not a record (torn by a crash, or written by an
    older version) reads as {}: a holder that says nothing about itself."""
    data = os.pread(fd, 65536, 0)
    if not data.strip():
        return None
    try:
        record = json.loads(data)
    except ValueError:
        return {}
    return record if isinstance(record, dict) else {}


def _alive(record: dict) -> bool:
    """Without flock: whether the recorded holder may still run (always, when it ran on another host)."""
    if record.get("host") != socket.gethostname() or not isinstance(record.get("pid"), int):
        return True
    started = process_start(record["pid"])
    return started is not None and started == record.get("process_start")


def _same_file(fd: int, path: Path) -> bool:
    try:
        return os.path.samestat(os.fstat(fd), os.stat(path, follow_symlinks=False))
    except FileNotFoundError:
        return False
