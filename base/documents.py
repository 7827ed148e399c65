"""Reading documents through `datasets`: local text, JSON lines or parquet files (optionally compressed), a
folder or glob of them, or a Hub dataset. gqa-uptrain trains on them and gqa-convert calibrates on them.
"""

from __future__ import annotations

import glob
from pathlib import Path

import datasets

from gqa_uptrain.errors import DataError

Rows = datasets.Dataset | datasets.IterableDataset

_BUILDERS = {".txt": "text", ".text": "text", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}
_COMPRESSION = {".gz", ".xz", ".bz2", ".zst", ".zip"}


def _builder(file: str) -> str:
    suffixes = [s for s in Path(file).suffixes if s not in _COMPRESSION]
    if not suffixes or suffixes[-1] not in _BUILDERS:
        known = ", ".join(sorted(_BUILDERS))
        raise DataError(f"{file}: unsupported data file type (use {known}, optionally compressed)")
    return _BUILDERS[suffixes[-1]]


def _local_files(pattern: str) -> list[str]:
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
    files = _local_files(path)
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
        if "Please pass `features` or at least one example" in str(error.__cause__ or error):
            raise DataError(f"data path {path} holds no rows") from None  # e.g. a text file of blank lines only
        raise DataError(f"data path {path}: {error.__cause__ or error}") from None
