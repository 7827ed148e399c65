"""Results cached by what produced them: the model's content and every setting that can change a score.

A key is the SHA-256 of (the model's digest, what was measured, settings). The base model is thus evaluated
once for any number of candidates, and a rerun with the same models and settings costs nothing. Entries are
written atomically, one per model and task, as they finish, so an interrupted run resumes where it stopped.
"""

import hashlib
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from huggingface_hub import try_to_load_from_cache

from gqa_uptrain.atomic_write import write_atomically
from gqa_uptrain.errors import DiskFullError, is_full_disk
from gqa_uptrain.hashing import sha256_file
from gqa_uptrain.provenance import PROVENANCE

# Files that decide a model's outputs; docs, model cards and provenance notes do not.
MODEL_FILE_SUFFIXES = (".json", ".safetensors", ".bin", ".model", ".txt", ".tiktoken", ".jinja")
IGNORED_FILES = {PROVENANCE}


def default_cache_dir() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(root) / "gqa_uptrain" / "eval"


def digest(value: Any) -> str:
    """A stable hash of JSON-able settings."""
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()


@contextmanager
def full_disk_said(what: str, folder: Path, then: str) -> Iterator[None]:
    """A full disk (ENOSPC, or EDQUOT: a quota) inside the block as one DiskFullError naming `what` and `folder`:
    Python's writes and matplotlib's raise it with no file name, so the line would not say where."""
    try:
        yield
    except OSError as error:
        if not is_full_disk(error):
            raise
        raise DiskFullError(f"disk full while writing {what} in {folder}: {then}") from None


def _write_json_atomically(path: Path, value: Any) -> None:
    write_atomically(path, json.dumps(value, indent=1, default=str))


class ResultCache:
    """JSON results on disk under `root`; `enabled=False` makes every lookup miss and every store a no-op."""

    def __init__(self, root: Path, enabled: bool = True) -> None:
        self.root = Path(root)
        self.enabled = enabled
        self._file_hashes_path = self.root / "file_hashes.json"
        self._file_hashes: dict[str, str] | None = None

    def _entry(self, key: str) -> Path:
        return self.root / "results" / key[:2] / f"{key}.json"

    def get(self, key: str) -> Any | None:
        path = self._entry(key)
        if not self.enabled or not path.is_file():
            return None
        try:
            return json.loads(path.read_bytes())
        except ValueError:  # torn or empty (a crash, a full disk, an older version): measured again, rewritten
            path.unlink(missing_ok=True)
            return None

    def put(self, key: str, value: Any) -> None:
        if self.enabled:
            self._write(self._entry(key), value)

    def _write(self, path: Path, value: Any) -> None:
        """Write one file of the cache atomically (a crash leaves the old entry or none, never a torn one)."""
        with full_disk_said("the results cache", self.root, "free space there or choose another --cache-dir, then "
                            "run the same command again (results cached before are kept)"):
            _write_json_atomically(path, value)

    def file_hash(self, path: Path) -> str:
        """SHA-256 of a file's bytes, remembered by (path, size, mtime) so a large checkpoint is read once."""
        stat = path.stat()
        memo_key = f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}"
        if self._file_hashes is None:
            self._file_hashes = self._read_file_hashes()
        if memo_key not in self._file_hashes:
            self._file_hashes[memo_key] = sha256_file(path)
            if self.enabled:
                self._write(self._file_hashes_path, self._file_hashes)
        return self._file_hashes[memo_key]

    def _read_file_hashes(self) -> dict[str, str]:
        """The remembered file hashes; an unreadable memo is forgotten (the hashes are computed again)."""
        if not (self.enabled and self._file_hashes_path.is_file()):
            return {}
        try:
            known = json.loads(self._file_hashes_path.read_bytes())
        except ValueError:
            return {}
        return known if isinstance(known, dict) else {}

    def model_digest(self, ref: str) -> str:
        """One hash of what a model is made of, the model's part of every result key (a report's `fingerprint`): of
        a local folder's files by content; for a Hub id, of the commit it resolved to (which pins content). Not
        gqa-uptrain's `model_fingerprint`, which keeps each file's print apart to say which ones changed."""
        folder = Path(ref)
        if folder.is_dir():
            files = sorted(
                p for p in folder.iterdir()
                if p.is_file() and p.suffix in MODEL_FILE_SUFFIXES and p.name not in IGNORED_FILES
            )
            return digest([(p.name, self.file_hash(p)) for p in files])
        config = try_to_load_from_cache(ref, "config.json")
        if not isinstance(config, str):  # not cached: open_model() has read it, so this is an unusual layout
            return digest(["hub", ref])
        return digest(["hub", ref, Path(config).parent.name])  # snapshots/<commit>/config.json


def result_key(fingerprint: str, measure: str, settings: dict) -> str:
    """Key of one measurement (an lm-eval task, a perplexity run) of one model under given settings."""
    return digest({"model": fingerprint, "measure": measure, "settings": settings})
