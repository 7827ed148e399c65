"""SHA-256 of files: one at a time, or many in child processes while this one goes on."""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys
from pathlib import Path

# Read in pieces that stay in the CPU cache while they are hashed: with 16 MB pieces SHA-256 took 1.5x the CPU time.
_HASH_CHUNK = 1 << 20


def sha256_file(path: Path) -> str:
    """SHA-256 of a file's bytes. A large file in the Hugging Face cache is named by its SHA-256 already, so it is
    not read."""
    cached = hub_cache_sha256(Path(path))
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
        self._known = {i: hub_cache_sha256(path) for i, path in enumerate(self.paths)}
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


def hub_cache_sha256(file: Path) -> str | None:
    """The Hub cache stores each large (LFS) file as blobs/<its sha256>, checked when it was downloaded."""
    if not file.is_symlink():
        return None
    target = file.resolve()
    if target.parent.name == "blobs" and re.fullmatch(r"[0-9a-f]{64}", target.name):
        return target.name
    return None
