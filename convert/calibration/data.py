"""Calibration text: what the converted model is fitted to reproduce, tokenised into equal sequences.

DATA is a local file, folder or glob (text, JSON lines or parquet, optionally compressed) or a Hub dataset id,
read as gqa-uptrain reads its training data; rows that hold `input_ids` are used as they are. Without DATA the
default is the public-domain books shipped beside this module (`books.jsonl.xz`, scripts/build_calibration_text.py):
English prose that works offline and shares no author with the shipped evaluation tasks. Books were chosen by
measurement: on a real model at one KV head they gave 0.48 nats lower WikiText-2 loss than the standard library's
docstrings, the earlier default (docs/experiments/calibrated-refinement.md).
"""

from __future__ import annotations

import ast
import hashlib
import json
import lzma
import random
import sysconfig
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Iterable, Iterator

import torch
from transformers import PreTrainedTokenizerBase

from gqa_uptrain.documents import check_token_ids, load_rows, naming_undecodable_files
from gqa_uptrain.errors import DataError
from gqa_uptrain.source import looks_local

DEFAULT_DATA = "public-domain-books"  # how the provenance names the shipped default text
BOOKS = Path(__file__).with_name("books.jsonl.xz")
PASSAGE_CHARS = 2_000  # the default text's documents: passages cut at paragraph ends, shuffled by the seed
_SHUFFLE_BUFFER = 10_000


@dataclass(frozen=True)
class Calibration:
    """The token ids [sequences, length] and what identifies them in the provenance record."""

    tokens: torch.Tensor
    data: str

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.tokens.to(torch.int64).numpy().tobytes()).hexdigest()

    def record(self, seed: int) -> dict:
        sequences, length = self.tokens.shape
        return {"data": self.data, "tokens": sequences * length, "sequences": sequences,
                "sequence_length": length, "seed": seed, "sha256": self.sha256}


def stdlib_docstrings() -> dict[str, list[str]]:
    """Docstrings of the standard library, read with `ast` (nothing is imported), keyed by module file."""
    from tqdm.auto import tqdm

    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"site-packages", "test", "tests", "idlelib", "lib2to3", "turtledemo"}
    files = sorted(p for p in root.rglob("*.py") if not skip & set(p.relative_to(root).parts))
    docs = {}
    for path in tqdm(files, desc="reading docstrings", unit="module"):
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        nodes = (n for n in ast.walk(tree) if isinstance(n, (ast.Module, ast.ClassDef, ast.FunctionDef,
                                                                ast.AsyncFunctionDef)))
        texts = [doc for node in nodes if (doc := ast.get_docstring(node)) and len(doc) >= 80]
        if texts:
            docs[path.relative_to(root).as_posix()] = texts
    return docs


def shipped_books() -> list[str]:
    """The default calibration text as passages of at least PASSAGE_CHARS characters, cut at paragraph ends, so
    that a shuffle mixes the books (each passage stays readable prose)."""
    passages = []
    with lzma.open(BOOKS, "rt", encoding="utf-8") as lines:
        for line in lines:
            current = ""
            for paragraph in json.loads(line)["text"].split("\n\n"):
                current = f"{current}\n\n{paragraph}" if current else paragraph
                if len(current) >= PASSAGE_CHARS:
                    passages.append(current)
                    current = ""
    return passages


def _local(data: str) -> str | None:
    """DATA as a local path (a relative one such as runs/x/train.jsonl too), None for a Hub dataset id."""
    return str(Path(data).expanduser()) if looks_local(data) or Path(data).expanduser().exists() else None


def _documents(data: str | None, seed: int, vocab_size: int | None) -> Iterator[str | list[int]]:
    if data is None:
        texts = shipped_books()
        random.Random(seed).shuffle(texts)
        return iter(texts)
    path = _local(data)
    rows = load_rows(path=path, streaming=True) if path else load_rows(dataset=data, streaming=True)
    rows = rows.shuffle(seed=seed, buffer_size=_SHUFFLE_BUFFER)
    return (document for row in rows if (document := _document(row, vocab_size, data)))


def _document(row: dict, vocab_size: int | None, where: str) -> str | list[int] | None:
    """A row's token ids (checked against the vocabulary), or its text (the `text` column, else its first string)."""
    if "input_ids" in row:
        check_token_ids([row["input_ids"]], vocab_size, where)
        return row["input_ids"]
    text = row.get("text", next((value for value in row.values() if isinstance(value, str)), None))
    return text if isinstance(text, str) and text.strip() else None


def calibration_tokens(tokenizer: PreTrainedTokenizerBase | None, data: str | None, tokens: int, length: int,
                       seed: int = 0, vocab_size: int | None = None) -> Calibration:
    """At least `tokens` tokens as whole sequences of `length`, documents joined by EOS (as in pretraining); given
    token ids must lie in the model's `vocab_size` (None: not checked)."""
    sequences = max(1, -(-tokens // length))
    stream = _token_stream(tokenizer, _documents(data, seed, vocab_size))
    with naming_undecodable_files([data and _local(data)]):
        ids = list(islice(stream, sequences * length))
    if len(ids) < sequences * length:
        raise DataError(f"calibration data {data or DEFAULT_DATA} holds {len(ids):,} tokens; "
                        f"{sequences * length:,} are needed (lower --calibration-tokens)")
    return Calibration(torch.tensor(ids).view(sequences, length), data or DEFAULT_DATA)


def _token_stream(tokenizer: PreTrainedTokenizerBase | None, documents: Iterable[str | list[int]]) -> Iterator[int]:
    eos = getattr(tokenizer, "eos_token_id", None)
    for document in documents:
        if isinstance(document, list):
            yield from document
            continue
        if tokenizer is None:
            raise DataError("the calibration data is text, but the source model has no tokenizer")
        yield from tokenizer(document, add_special_tokens=False, verbose=False)["input_ids"]
        if eos is not None:
            yield eos
