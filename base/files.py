"""Writing a file so that readers never see half of it, hashing one without reading it twice, and putting a finished
output folder in place: renames that never replace by accident, an atomic swap, and a lock per output."""

from __future__ import annotations

import ctypes
import errno
import hashlib
import os
import re
import subprocess
import sys
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

from gqa_uptrain import locks
from gqa_uptrain.errors import OutputError

# Read in pieces that stay in the CPU cache while they are hashed: with 16 MB pieces SHA-256 took 1.5x the CPU time.
_HASH_CHUNK = 1 << 20


_FULL_DISK = {errno.ENOSPC, errno.EDQUOT}

P = TypeVar("P", str, Path)


def expand_home(path: P) -> P:
    """A path as the user wrote it, `~` at its start expanded as the shell would. Recipes, quoted arguments and
    `--flag=~/x` reach us unexpanded, and taken literally they make a folder named `~` in the working folder, one
    `rm -rf ~` away from a deleted home. Anything else (a Hub id, a relative path) is returned as it is."""
    if isinstance(path, (str, Path)) and str(path).startswith("~"):
        return type(path)(os.path.expanduser(path))
    return path


def check_output_folder(path: Path, what: str) -> None:
    """Refuse, in one OutputError line, an output folder that is not one and cannot become one: a file, a link to
    nothing, or a folder (where it does not exist yet, the nearest one above it) this process cannot write. A link
    to a folder is allowed: it is how users put an output on another disk. `what` names it, e.g. "output_dir"."""
    path = Path(path)
    if path.is_symlink() and not path.exists():
        raise OutputError(f"{what} {path} is a link to {os.readlink(path)}, which does not exist; create that "
                          f"folder, or remove the link or choose another {what}")
    existing = next(p for p in (path, *Path(os.path.abspath(path)).parents) if p.exists())
    if not existing.is_dir():
        where = "" if existing == path else f"{existing}, above it, "
        raise OutputError(f"{what} {path}: {where}is a file, not a folder; remove it or choose another {what}")
    if not os.access(existing, os.W_OK | os.X_OK):
        where = "" if existing == path else f" ({existing}, where it would be made)"
        raise OutputError(f"{what} {path} cannot be written{where}: no permission, or a read-only file system; "
                          f"choose another {what}")


def is_full_disk(error: BaseException) -> bool:
    """Whether `error` is a write refused for want of space: a full file system (ENOSPC) or a quota (EDQUOT)."""
    return isinstance(error, OSError) and error.errno in _FULL_DISK


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


def flush_to_disk(paths: Iterable[Path]) -> None:
    """fsync each file among `paths` (folders and the rest skipped) before the rename that publishes them: without
    it a crash soon after can leave a complete-looking output whose files are empty or cut short."""
    for path in paths:
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


def sha256_file(path: Path) -> str:
    """SHA-256 of a file's bytes. A large file in the Hugging Face cache is named by its SHA-256 already, so it is
    not read."""
    cached = _hub_cache_sha256(Path(path))
    if cached is not None:
        return cached
    digest, buffer = hashlib.sha256(), bytearray(_HASH_CHUNK)
    view = memoryview(buffer)
    with open(path, "rb", buffering=0) as f:
        while count := f.readinto(buffer):
            digest.update(view[:count])
    return digest.hexdigest()


# A hashing child: it claims files by reading their 4-byte indices from a pipe all children share (a read of at most
# PIPE_BUF bytes is atomic, so each index reaches one child) and prints "index digest" for each; it stops when its
# parent is gone (killed outright, so it never cancelled). Standard library only, so that it starts in milliseconds.
_HASH_CHILD = f"""
import hashlib, os, sys
claims, paths, parent = int(sys.argv[1]), sys.argv[2:], os.getppid()
buffer = bytearray({_HASH_CHUNK})
view = memoryview(buffer)
while len(claim := os.read(claims, 4)) == 4:
    index = int.from_bytes(claim, "little")
    digest = hashlib.sha256()
    with open(paths[index], "rb", buffering=0) as f:
        while count := f.readinto(buffer):
            if os.getppid() != parent:
                sys.exit(1)
            digest.update(view[:count])
    print(index, digest.hexdigest(), flush=True)
"""


class BackgroundHashes:
    """SHA-256 of files, computed by a child process while this one goes on (importing, planning, copying); `results`
    collects them.

    Why a process and not a thread: a thread hashing beside the imports of torch and transformers waits for the GIL
    after every read, so it hashes at a fraction of its speed while they run. One child hashes while this process
    works; once it waits in `results`, one more child per other CPU shares the files left (each file goes to whichever
    child is free). A file no child hashed (unreadable, a child killed, no Python to start) is hashed in this process
    by `results`, which then raises the error `sha256_file` raises.
    """

    def __init__(self, paths: list[Path]):
        self.paths = [Path(path) for path in paths]
        self._known = {i: _hub_cache_sha256(path) for i, path in enumerate(self.paths)}
        self._children: list[subprocess.Popen] = []
        self._pipes: tuple[int, int] | None = None  # the children's: claims to read, output to write
        self._output = None
        todo = [i for i, digest in self._known.items() if digest is None]
        if todo and sys.executable:
            try:
                self._start(todo)
            except OSError:  # no child could start: `results` hashes here
                self.cancel()

    def _start(self, todo: list[int]) -> None:
        claims, claims_write = os.pipe()
        output, output_write = os.pipe()
        self._pipes, self._output = (claims, output_write), os.fdopen(output, "r")
        try:
            self._spawn()
            os.write(claims_write, b"".join(i.to_bytes(4, "little") for i in todo))
        finally:
            os.close(claims_write)

    def _spawn(self) -> None:
        claims, output = self._pipes
        self._children.append(subprocess.Popen([sys.executable, "-I", "-S", "-c", _HASH_CHILD, str(claims),
                                                *map(str, self.paths)],
                                               stdout=output, stderr=subprocess.DEVNULL, pass_fds=(claims,)))

    def results(self) -> dict[Path, str]:
        """Every file's SHA-256, once all are hashed."""
        if self._output is not None:
            try:
                for _ in range(_cpus() - 1):  # this process only waits from now on: its CPU can hash too
                    self._spawn()
            except OSError:
                pass
            self._close_pipes()
            with self._output:
                for line in self._output:
                    index, digest = line.split()
                    self._known[int(index)] = digest
            self._output = None
        for child in self._children:
            child.wait()
        return {path: self._known[i] or sha256_file(path) for i, path in enumerate(self.paths)}

    def __enter__(self) -> BackgroundHashes:
        return self

    def __exit__(self, *exc) -> None:
        self.cancel()

    def cancel(self) -> None:
        """Stop hashing (what needed the hashes failed or was interrupted); nothing left to stop after `results`."""
        for child in self._children:
            child.kill()
            child.wait()
        self._close_pipes()
        if self._output is not None:
            self._output.close()
            self._output = None

    def _close_pipes(self) -> None:
        """Close this process's ends of the children's pipes, so that the output ends when the last child does."""
        for fd in self._pipes or ():
            os.close(fd)
        self._pipes = None


def _cpus() -> int:
    """The CPUs this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


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
