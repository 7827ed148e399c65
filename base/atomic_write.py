"""Writing a file so that readers never see half of it, and making sure what is written is on disk."""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_file(path: Path) -> Iterator[Path]:
    """A hidden temporary path beside `path` (parents created) for the block to write, renamed over `path` when the
    block ends, removed when it fails. A reader (another process, a resumed run, a crash) sees the old file or the
    new one, never a torn one; the temporary name carries the process id, so concurrent writers of one file do not
    collide, and ends in `path`'s suffix, so a library that picks the format from the name (matplotlib) still
    can."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = path.with_name(f".{path.name}.{os.getpid()}.tmp{path.suffix}")
    try:
        yield temp
        os.replace(temp, path)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise


def write_atomically(path: Path, data: str | bytes) -> None:
    """Write `data` to `path` through `atomic_file`."""
    with atomic_file(path) as temp:
        if isinstance(data, bytes):
            temp.write_bytes(data)
        else:
            temp.write_text(data)


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
