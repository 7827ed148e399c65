"""Training data through `datasets`: load, tokenise, pack into full sequences, batch with a resumable position.

Documents are tokenised with the model's tokenizer, joined with EOS between them and cut into rows of exactly
`seq_len` tokens (no padding; the tail of each map batch of 1,000 documents that does not fill a row is
dropped, as in transformers' run_clm). Rows that already hold `input_ids` are packed without tokenising.
Map-style data is shuffled by the seedable sampler (order = f(seed, epoch)); streaming data is shuffled by
documents in a buffer seeded the same way. The position is (epoch, batches taken in that epoch): resuming
skips exactly those batches, so a resumed run sees the batches it would have seen.
"""

from __future__ import annotations

from collections.abc import Iterator
from itertools import chain

import datasets
import torch
from accelerate import Accelerator
from datasets.fingerprint import Hasher
from torch.utils.data import DataLoader
from transformers import PreTrainedTokenizerBase

from gqa_uptrain.documents import Rows, load_rows
from gqa_uptrain.errors import DataError
from gqa_uptrain.tokenizer_identity import tokenizer_fingerprint

from .recipe import DataSpec, SourceSpec

_PACK_BATCH = 1000


def load_source(source: SourceSpec, streaming: bool) -> Rows:
    """The raw documents of one source, as a Dataset (or IterableDataset when streaming)."""
    return load_rows(path=source.path, dataset=source.dataset, name=source.name, split=source.split,
                     streaming=streaming, sample_by=source.sample_by)


def _columns(rows: Rows) -> list[str]:
    if rows.column_names is not None:
        return list(rows.column_names)
    first = next(iter(rows), None)
    return list(first) if first is not None else []


def _packed_fingerprint(
    rows: datasets.Dataset, part: str, tokenizer: PreTrainedTokenizerBase, *key: object
) -> str | None:
    """Names packed rows by the tokenizer's content (`tokenizer_fingerprint`), not the folder it was loaded from.

    datasets fingerprints `map` by pickling the function, tokenizer included, and a tokenizer's pickle holds its
    path; so every converted model (same tokenizer, new folder) would tokenise the whole corpus again. The input
    rows are named from public facts, as datasets' own fingerprint (`Dataset._fingerprint`) is private: the Arrow
    files `load_dataset` prepared (their folder's name hashes the builder config and the data files' origins,
    modification times included) and `part`, which of their rows these are. None (datasets' default) for rows held
    in memory: `map` caches nothing for them.
    """
    files = [entry["filename"] for entry in rows.cache_files]
    if not files:
        return None
    return Hasher.hash((files, part, tokenizer_fingerprint(tokenizer), pack.__code__, *key))


def pack(
    rows: Rows, tokenizer: PreTrainedTokenizerBase, source: SourceSpec, seq_len: int, num_proc: int | None,
    part: str = "all",
) -> Rows:
    """Rows of exactly `seq_len` token ids: documents joined with EOS, cut without padding.

    `part` says which rows of the loaded source these are ("all", or a slice such as "first 200"), for the cache.
    """
    columns = _columns(rows)
    pretokenized = "input_ids" in columns
    if not pretokenized and source.text_field not in columns:
        where = source.path or source.dataset
        raise DataError(f"{where}: no {source.text_field!r} column (columns: {', '.join(columns) or 'none'})")
    eos = tokenizer.eos_token_id
    if eos is None:
        raise DataError("the tokenizer has no EOS token to put between documents")

    def pack_batch(batch: dict) -> dict:
        ids = batch["input_ids"] if pretokenized else tokenizer(batch[source.text_field], verbose=False)["input_ids"]
        stream = list(chain.from_iterable(doc if doc[-1:] == [eos] else doc + [eos] for doc in ids if doc))
        return {"input_ids": [stream[i : i + seq_len] for i in range(0, len(stream) - seq_len + 1, seq_len)]}

    streaming = isinstance(rows, datasets.IterableDataset)
    kwargs = {} if streaming else {
        "num_proc": num_proc, "desc": "Tokenising and packing",
        "new_fingerprint": _packed_fingerprint(rows, part, tokenizer, source.text_field, seq_len),
    }
    return rows.map(pack_batch, batched=True, batch_size=_PACK_BATCH, remove_columns=columns, **kwargs)


def _require_rows(rows: Rows, what: str, source: SourceSpec, seq_len: int) -> None:
    empty = len(rows) == 0 if isinstance(rows, datasets.Dataset) else next(iter(rows), None) is None
    if empty:
        where = source.path or source.dataset
        raise DataError(f"{what} data {where} holds not one full sequence of data.seq_len={seq_len} tokens")


def build_datasets(spec: DataSpec, tokenizer: PreTrainedTokenizerBase, seed: int) -> tuple[Rows, Rows]:
    """Packed (train, validation) rows; DataError if either is empty."""
    train_docs = load_source(spec.train, spec.streaming)
    if spec.validation is not None:
        val_docs = load_source(spec.validation, spec.streaming)
        train_part = val_part = "all"
    else:
        val_docs, train_docs = train_docs.take(spec.holdout_docs), train_docs.skip(spec.holdout_docs)
        val_part, train_part = f"first {spec.holdout_docs}", f"after {spec.holdout_docs}"
    if spec.streaming:
        train_docs = train_docs.shuffle(seed=seed, buffer_size=spec.shuffle_buffer)
    train = pack(train_docs, tokenizer, spec.train, spec.seq_len, spec.num_proc, train_part)
    val = pack(val_docs, tokenizer, spec.validation or spec.train, spec.seq_len, spec.num_proc, val_part)
    _require_rows(train, "training", spec.train, spec.seq_len)
    _require_rows(val, "validation", spec.validation or spec.train, spec.seq_len)
    return train.with_format("torch"), val.with_format("torch")


def train_loader(rows: Rows, micro_batch: int) -> DataLoader:
    """Unprepared loader; Accelerator.prepare (with the seedable sampler) shards and seeds it."""
    shuffle = isinstance(rows, datasets.Dataset)
    pin = torch.cuda.is_available()
    return DataLoader(rows, batch_size=micro_batch, shuffle=shuffle, drop_last=True, pin_memory=pin)


def val_loader(rows: Rows, micro_batch: int, batches: int, world_size: int) -> DataLoader:
    """The first `batches` x `world_size` micro-batches of validation rows, the same every evaluation."""
    count = batches * micro_batch * world_size
    if isinstance(rows, datasets.Dataset):
        rows = rows.select(range(min(count, len(rows))))
    else:
        rows = rows.take(count)
    return DataLoader(rows, batch_size=micro_batch, shuffle=False)


class Batches:
    """Endless training batches over epochs, with (epoch, batches) as the position a checkpoint records."""

    def __init__(self, accelerator: Accelerator, loader: DataLoader, epoch: int = 0, batches: int = 0) -> None:
        self.accelerator, self.loader = accelerator, loader
        self.epoch, self.batches = epoch, batches
        self._iterator: Iterator | None = None

    def __iter__(self) -> Batches:
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        while True:
            if self._iterator is None:
                self.loader.set_epoch(self.epoch)
                loader = self.loader
                if self.batches:
                    loader = self.accelerator.skip_first_batches(self.loader, self.batches)
                self._iterator = iter(loader)
            batch = next(self._iterator, None)
            if batch is not None:
                self.batches += 1
                return batch
            if self.batches == 0:
                raise DataError("the training data yields no full micro-batch: use more data or a smaller batch")
            self.epoch, self.batches, self._iterator = self.epoch + 1, 0, None

    def state(self) -> dict[str, int]:
        return {"epoch": self.epoch, "batches": self.batches}
