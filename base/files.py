"""Writing a file so that readers never see half of it, hashing one without reading it twice, and putting a finished
output folder in place: renames that never replace by accident, an atomic swap, and a lock per output."""

from __future__ import annotations

import ctypes
import errno
import hashlib
import os
import re
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from gqa_uptrain import locks

_HASH_CHUNK = 16 << 20


def write_atomically(path: Path, data: str | bytes) -> None:
    """Write `data` beside `path` under a hidden name, then rename it over `path` (parents created).

    A reader (another process, a resumed run, a crash) sees the old file or the new one, never a torn one; the
    temporary name carries the process id, so concurrent writers of one file do not collide.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        if isinstance(data, bytes):
            temp.write_bytes(data)
        else:
            temp.write_text(data)
        os.replace(temp, path)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise


def sha256_file(path: Path, cancel: threading.Event | None = None) -> str | None:
    """SHA-256 of a file's bytes; None only once `cancel` is set (hashing runs beside other work: hashlib releases
    the GIL). A large file in the Hugging Face cache is named by its SHA-256 already, so it is not read."""
    cached = _hub_cache_sha256(Path(path))
    if cached is not None:
        return cached
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            if cancel is not None and cancel.is_set():
                return None
            digest.update(chunk)
    return digest.hexdigest()


def _hub_cache_sha256(file: Path) -> str | None:
    """The Hub cache stores each large (LFS) file as blobs/<its sha256>, checked when it was downloaded."""
    if not file.is_symlink():
        return None
    target = file.resolve()
    if target.parent.name == "blobs" and re.fullmatch(r"[0-9a-f]{64}", target.name):
        return target.name
    return None


# renameat2(2) flags (linux/fs.h); AT_FDCWD makes the paths relative to the working folder, as os.rename's are.
_RENAME_NOREPLACE, _RENAME_EXCHANGE, _AT_FDCWD = 1, 2, -100
# What renameat2 answers where the kernel, the C library or the file system cannot do it (NFS, some FUSE).
_UNSUPPORTED = {errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP}


def _renameat2(source: Path, target: Path, flags: int) -> bool:
    """renameat2 through the C library; False where it is not available for these paths, OSError on a real
    failure."""
    function = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if function is None:  # not Linux, or a C library older than glibc 2.28
        return False
    if function(_AT_FDCWD, os.fsencode(source), _AT_FDCWD, os.fsencode(target), flags) == 0:
        return True
    code = ctypes.get_errno()
    if code in _UNSUPPORTED:
        return False
    raise OSError(code, os.strerror(code), str(source), None, str(target))


def rename_no_replace(source: Path, target: Path) -> None:
    """Rename `source` to `target`; FileExistsError when `target` exists (os.rename would replace an empty folder
    or a file there). Atomic on Linux; elsewhere checked just before renaming."""
    if _renameat2(source, target, _RENAME_NOREPLACE):
        return
    if os.path.lexists(target):
        raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(target))
    os.rename(source, target)


def exchange_paths(first: Path, second: Path) -> bool:
    """Swap two existing paths in one step (Linux renameat2 RENAME_EXCHANGE): at no instant does either name
    point at nothing. False, with nothing changed, where the system or file system cannot swap."""
    return _renameat2(first, second, _RENAME_EXCHANGE)


def lock_path(output: Path) -> Path:
    """The lock file of an output: `.NAME.lock` beside it."""
    return output.with_name(f".{output.name}.lock")


@contextmanager
def output_lock(output: Path, owner: str) -> Iterator[bool]:
    """Hold the lock of `output` (`.NAME.lock` beside it, see `gqa_uptrain.locks`) for the block, or raise
    OutputBusyError naming the live process that holds it. Yields whether the kernel holds the lock: False on a
    file system that cannot lock (some network mounts), where only the holder's record keeps another writer out,
    and one that starts at the same instant goes unnoticed."""
    path = lock_path(output)

    def busy(record: dict) -> str:
        holder = (f"{record.get('owner', 'a process')} (pid {record['pid']} on {record.get('host', '?')})"
                  if record.get("pid") else "another process")
        return f"{output}: {holder} is writing it now (lock {path}); wait for it to end, or choose another output"

    with locks.held(path, owner, busy) as lock:
        yield lock.flocked
