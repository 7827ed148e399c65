"""Reading documents through `datasets`: local text, JSON lines or parquet files (optionally compressed), a
folder or glob of them, or a Hub dataset. gqa-uptrain trains on them and gqa-convert calibrates on them.
"""

from __future__ import annotations

import bz2
import codecs
import glob
import gzip
import lzma
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

import datasets

from gqa_uptrain.errors import DataError

Rows = datasets.Dataset | datasets.IterableDataset

_BUILDERS = {".txt": "text", ".text": "text", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}
_COMPRESSION = {".gz", ".xz", ".bz2", ".zst", ".zip"}
_OPENERS = {".gz": gzip.open, ".xz": lzma.open, ".bz2": bz2.open}  # what `first_bad_byte` can look into
_SCAN_CHUNK = 1 << 20


def _builder(file: str) -> str:
    suffixes = [s for s in Path(file).suffixes if s not in _COMPRESSION]
    if not suffixes or suffixes[-1] not in _BUILDERS:
        known = ", ".join(sorted(_BUILDERS))
        raise DataError(f"{file}: unsupported data file type (use {known}, optionally compressed)")
    return _BUILDERS[suffixes[-1]]


def local_files(pattern: str) -> list[str]:
    """The files a local data path names: a file, every file under a folder, or a glob's matches; sorted."""
    path = Path(pattern)
    files = sorted(str(p) for p in path.rglob("*") if p.is_file()) if path.is_dir() else sorted(glob.glob(pattern))
    if not files:
        raise DataError(f"data path {pattern} matches no file")
    return files


def load_rows(*, path: str | None = None, dataset: str | None = None, name: str | None = None,
              split: str = "train", streaming: bool = False, sample_by: str = "document") -> Rows:
    """The raw documents of local files (`path`) or of a Hub `dataset`, as a Dataset or IterableDataset."""
    if dataset is not None:
        try:
            return datasets.load_dataset(dataset, name, split=split, streaming=streaming)
        except Exception as error:  # the Hub, a missing config or split: all user-fixable, all one line
            raise DataError(f"dataset {dataset!r} ({name}, {split}): {error}") from None
    files = local_files(path)
    builders = {_builder(file) for file in files}
    if len(builders) > 1:
        raise DataError(f"data path {path} mixes file types ({', '.join(sorted(builders))})")
    builder = builders.pop()
    if all(Path(file).stat().st_size == 0 for file in files):
        raise DataError(f"data path {path} holds no rows (its files are empty)")
    kwargs = {"sample_by": sample_by} if builder == "text" else {}
    try:
        return datasets.load_dataset(builder, data_files=files, split="train", streaming=streaming, **kwargs)
    except StopIteration:  # what the json builder raises on empty files
        raise DataError(f"data path {path} holds no rows") from None
    except (datasets.exceptions.DatasetGenerationError, ValueError) as error:
        cause = error.__cause__ or error
        if "Please pass `features` or at least one example" in str(cause):
            raise DataError(f"data path {path} holds no rows") from None  # e.g. a text file of blank lines only
        named = _undecodable([path], cause) if isinstance(cause, UnicodeDecodeError) else None
        raise (named or DataError(f"data path {path}: {cause}")) from None


def check_token_ids(docs: Iterable, vocab_size: int | None, where: str | None) -> None:
    """Given token ids must be ids of the model's vocabulary (an embedding row each): a null, a float, a string, a
    negative id or one past the vocabulary is one DataError line, not a TypeError or an index error deep inside the
    model. `vocab_size` None: only the types are checked."""
    for doc in docs:
        if not isinstance(doc, list) or any(not isinstance(i, int) or isinstance(i, bool) for i in doc):
            raise DataError(f"{where}: a row's 'input_ids' is not a list of integer token ids")
        if doc and vocab_size is not None and (max(doc) >= vocab_size or min(doc) < 0):
            bad = max(doc) if max(doc) >= vocab_size else min(doc)
            raise DataError(f"{where}: token id {bad} is outside the model's vocabulary of {vocab_size} ids "
                            f"(0-{vocab_size - 1}): were these ids made with another tokenizer?")


def first_bad_byte(file: str | Path) -> int | None:
    """The offset (in the decompressed bytes) of the first byte of `file` that is not UTF-8, None when all are, or
    when its compression (.zst, .zip) cannot be looked into here."""
    suffix = Path(file).suffix
    if suffix in _COMPRESSION and suffix not in _OPENERS:
        return None
    decoder, offset = codecs.getincrementaldecoder("utf-8")(), 0
    with _OPENERS.get(suffix, open)(file, "rb") as f:
        while True:
            chunk = f.read(_SCAN_CHUNK)
            pending = len(decoder.getstate()[0])  # bytes of a character cut by the previous chunk
            try:
                decoder.decode(chunk, final=not chunk)
            except UnicodeDecodeError as error:
                return offset - pending + error.start
            if not chunk:
                return None
            offset += len(chunk)


def _undecodable(paths: Iterable[str | None], error: UnicodeDecodeError) -> DataError | None:
    """The one line for the first file of the local data `paths` that is not UTF-8, None when each of them is."""
    for path in filter(None, paths):
        for file in local_files(path):
            offset = first_bad_byte(file)
            if offset is not None:
                return DataError(f"{file}: not UTF-8 text (byte offset {offset:,}: {error.reason}): convert the "
                                 "file to UTF-8, or remove the bad bytes")
    return None


@contextmanager
def naming_undecodable_files(paths: Iterable[str | None]) -> Iterator[None]:
    """Text that is not UTF-8, met while rows are streamed from the local data `paths` (datasets decodes lazily: at
    any step of a run, in an error that names no file), as one DataError naming the file and the offset of its first
    bad byte. Only where one of those files holds such a byte: any other decoding error is not the data's and goes
    on as it was."""
    try:
        yield
    except UnicodeDecodeError as error:
        named = _undecodable(paths, error)
        if named is None:
            raise
        raise named from None
