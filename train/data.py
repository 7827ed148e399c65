"""Training data through `datasets`: load, tokenise, pack into full sequences, batch with a resumable position.

Documents are tokenised with the model's tokenizer, joined with EOS between them and cut into rows of exactly
`seq_len` tokens (no padding; the tail of each map batch of 1,000 documents that does not fill a row is
dropped, as in transformers' run_clm). Rows that already hold `input_ids` are packed without tokenising.
Map-style data is shuffled by the seedable sampler (order = f(seed, epoch)); streaming data is shuffled by
documents in a buffer seeded the same way. The position is (epoch, batches taken in that epoch): resuming
skips exactly those batches, so a resumed run sees the batches it would have seen.

Only what the run reads is tokenised: given the rows the budget needs (`build_datasets(..., train_rows=...)`),
map-style documents are packed in portions of whole map batches from the start until the rows cover the budget
plus 10% (`pack_enough`); the rows are then exactly the first rows packing the whole file would give, and a
resumed run, asking for as many, packs the same ones. Streaming data is tokenised as it is read.

Held-out validation documents (`holdout_docs`, when there is no `validation` source) are at most a tenth of the
documents, so a small file never leaves training with nothing; a line says so when the cap applies.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from itertools import chain

import datasets
import torch
from accelerate import Accelerator
from datasets.fingerprint import Hasher
from torch.utils.data import DataLoader
from transformers import PreTrainedTokenizerBase

from gqa_uptrain.documents import Rows, check_token_ids, load_rows
from gqa_uptrain.errors import DataError
from gqa_uptrain.tokenizer_identity import tokenizer_fingerprint

from .recipe import DataSpec, SourceSpec

_PACK_BATCH = 1000
HOLDOUT_SHARE = 0.1  # at most this share of the documents is held out for validation
_MARGIN = 1.1  # rows packed beyond what the budget needs (the loader drops incomplete batches)


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
    part: str = "all", vocab_size: int | None = None,
) -> Rows:
    """Rows of exactly `seq_len` token ids: documents joined with EOS, cut without padding.

    `part` says which rows of the loaded source these are ("all", or a slice such as "first 200"), for the cache.
    A document whose text is not a string (`null`), or whose given `input_ids` fall outside the model's
    `vocab_size`, is one DataError line, not a tokenizer's TypeError or an index error deep inside the model.
    """
    columns = _columns(rows)
    pretokenized = "input_ids" in columns
    if not pretokenized and source.text_field not in columns:
        where = source.path or source.dataset
        raise DataError(f"{where}: no {source.text_field!r} column (columns: {', '.join(columns) or 'none'})")
    eos = tokenizer.eos_token_id
    if eos is None:
        raise DataError("the tokenizer has no EOS token to put between documents")

    where = source.path or source.dataset

    def pack_batch(batch: dict) -> dict:
        if pretokenized:
            ids = batch["input_ids"]
            check_token_ids(ids, vocab_size, where)
        else:
            texts = batch[source.text_field]
            bad = next((text for text in texts if not isinstance(text, str)), "")
            if not isinstance(bad, str):
                kind = "null" if bad is None else f"a {type(bad).__name__}, not a string"
                raise DataError(f"{where}: a row's {source.text_field!r} is {kind}: give every row a string of text, "
                                "or drop the row")
            ids = tokenizer(texts, verbose=False)["input_ids"]
        stream = list(chain.from_iterable(doc if doc[-1:] == [eos] else doc + [eos] for doc in ids if doc))
        return {"input_ids": [stream[i : i + seq_len] for i in range(0, len(stream) - seq_len + 1, seq_len)]}

    streaming = isinstance(rows, datasets.IterableDataset)
    kwargs = {} if streaming else {
        "num_proc": num_proc, "desc": "Tokenising and packing",
        "new_fingerprint": _packed_fingerprint(rows, part, tokenizer, source.text_field, seq_len, vocab_size),
    }
    return rows.map(pack_batch, batched=True, batch_size=_PACK_BATCH, remove_columns=columns, **kwargs)


def pack_enough(
    rows: datasets.Dataset, tokenizer: PreTrainedTokenizerBase, source: SourceSpec, seq_len: int,
    num_proc: int | None, part: str, needed: int, vocab_size: int | None = None,
) -> tuple[datasets.Dataset, int]:
    """(packed rows, documents read): the first documents' rows, `needed` x 1.1 of them where there are that many.

    Documents are taken in whole map batches, so these are exactly the first rows `pack` gives for all of them.
    The first portion is one map batch; each next one is what the rows per document so far say is still missing.
    """
    want, total = math.ceil(needed * _MARGIN), len(rows)
    portions: list[datasets.Dataset] = []
    have = taken = 0
    while taken < total and have < want:
        estimate = math.ceil((want - have) * taken / have * _MARGIN) if have else 2 * taken
        count = max(_PACK_BATCH, math.ceil(estimate / _PACK_BATCH) * _PACK_BATCH)
        end = min(total, taken + count)
        packed = pack(rows.select(range(taken, end)), tokenizer, source, seq_len, num_proc,
                      f"{part}, documents {taken}-{end}", vocab_size)
        portions.append(packed)
        have, taken = have + len(packed), end
    return (datasets.concatenate_datasets(portions) if len(portions) > 1 else portions[0]), taken


def _pack_for(
    rows: Rows, tokenizer: PreTrainedTokenizerBase, source: SourceSpec, spec: DataSpec, part: str,
    needed: int | None, what: str, say: Callable[[str], None], vocab_size: int | None = None,
) -> Rows:
    """`pack` all documents, or (map-style, `needed` given) only the first ones that cover `needed` rows."""
    if needed is None or not isinstance(rows, datasets.Dataset) or len(rows) == 0:
        return pack(rows, tokenizer, source, spec.seq_len, spec.num_proc, part, vocab_size)
    packed, read = pack_enough(rows, tokenizer, source, spec.seq_len, spec.num_proc, part, needed, vocab_size)
    if read < len(rows):
        say(f"data: tokenised the first {read:,} of {len(rows):,} {what} documents, {len(packed):,} sequences "
            f"for the {needed:,} the run reads")
    return packed


def _holdout(docs: Rows, holdout_docs: int, say: Callable[[str], None]) -> int:
    """How many documents to hold out: `holdout_docs`, but at most a tenth of a map-style source's documents."""
    if not isinstance(docs, datasets.Dataset):
        return holdout_docs  # streaming: the length is not known before reading it all
    cap = max(1, math.floor(len(docs) * HOLDOUT_SHARE)) if len(docs) > 1 else 0
    if holdout_docs <= cap:
        return holdout_docs
    say(f"data: holding out {cap:,} of {len(docs):,} documents for validation, not data.holdout_docs="
        f"{holdout_docs:,} (at most {HOLDOUT_SHARE:.0%} are held out, so that training keeps the rest)")
    return cap


def _require_rows(rows: Rows, what: str, source: SourceSpec, seq_len: int, hint: str = "") -> None:
    empty = len(rows) == 0 if isinstance(rows, datasets.Dataset) else next(iter(rows), None) is None
    if empty:
        where = source.path or source.dataset
        raise DataError(f"{what} data {where} holds not one full sequence of data.seq_len={seq_len} tokens{hint}")


def build_datasets(
    spec: DataSpec, tokenizer: PreTrainedTokenizerBase, seed: int, train_rows: int | None = None,
    val_rows: int | None = None, say: Callable[[str], None] = print, vocab_size: int | None = None,
) -> tuple[Rows, Rows]:
    """Packed (train, validation) rows; DataError if either is empty, or if given token ids fall outside the
    model's `vocab_size` (None: not checked).

    `train_rows` and `val_rows` are the rows the run will read (None: all): map-style sources are tokenised only
    as far as they cover them (see the module docstring). `say` prints a line about what was decided.
    """
    train_docs = load_source(spec.train, spec.streaming)
    if spec.validation is not None:
        val_docs = load_source(spec.validation, spec.streaming)
        train_part = val_part = "all"
        train_hint = val_hint = ""
    else:
        holdout = _holdout(train_docs, spec.holdout_docs, say)
        val_docs, train_docs = train_docs.take(holdout), train_docs.skip(holdout)
        val_part, train_part = f"first {holdout}", f"after {holdout}"
        train_hint = f" once {holdout:,} documents are held out (lower data.holdout_docs or give data.validation)"
        val_hint = f" in the {holdout:,} documents held out for validation (give data.validation)"
    if spec.streaming:
        train_docs = train_docs.shuffle(seed=seed, buffer_size=spec.shuffle_buffer)
    val_source = spec.validation or spec.train
    train = _pack_for(train_docs, tokenizer, spec.train, spec, train_part, train_rows, "training", say, vocab_size)
    val = _pack_for(val_docs, tokenizer, val_source, spec, val_part, val_rows, "validation", say, vocab_size)
    _require_rows(train, "training", spec.train, spec.seq_len, train_hint)
    _require_rows(val, "validation", val_source, spec.seq_len, val_hint)
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
