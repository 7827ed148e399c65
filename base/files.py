"""Writing a file so that readers never see half of it, and hashing one without reading it twice."""

from __future__ import annotations

import hashlib
import os
import re
import threading
from pathlib import Path

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
