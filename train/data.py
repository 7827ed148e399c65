"""Training data through `datasets`: load, tokenise, pack into full sequences, batch with a resumable position.

Documents are tokenised with the model's tokenizer, joined with EOS between them and cut into rows of exactly
`seq_len` tokens (no padding; the tail of each portion of documents that does not fill a row is dropped, as
transformers' run_clm drops each map batch's). Rows that already hold `input_ids` are packed without tokenising.
Map-style data is shuffled by the seedable sampler (order = f(seed, epoch)); streaming data is shuffled by
documents in a buffer seeded the same way. The position is (epoch, batches taken in that epoch): resuming
skips exactly those batches, so a resumed run sees the batches it would have seen.

Only what the run reads is tokenised: given the rows the budget needs (`build_datasets(..., train_rows=...)`),
map-style documents are packed in portions from the start (1, 2, 4, ... documents, then 1,000 at a time) until
the rows cover the budget plus 10% (`pack_enough`), so a short run on whole books tokenises a book or two, not the
file. The portions are fixed by position, not by the budget: the rows are the first rows packing the whole file
gives, a resumed run packs the same ones, and each portion is cached by datasets under a name made of the prepared
data files and the tokenizer's content (`_packed_fingerprint`), so a rerun, or a run with another budget or from
another converted model, tokenises nothing it has tokenised before. Streaming data is tokenised as it is read.

Held-out validation documents (`holdout_docs`, when there is no `validation` source) are at most a tenth of the
documents, so a small file never leaves training with nothing; a line says so when the cap applies.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
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


def portions(total: int) -> Iterator[tuple[int, int]]:
    """The document ranges [start, end) packing takes one after another: 1, 2, 4, ... documents, then
    `_PACK_BATCH` at a time. They depend on the position alone, never on the budget, so that runs with other budgets
    reuse the cached portions, and the rows of a smaller budget are the first rows of a larger one's."""
    start, size = 0, 1
    while start < total:
        end = min(total, start + size)
        yield start, end
        start, size = end, min(2 * size, _PACK_BATCH)


@contextmanager
def _progress_bars(shown: bool) -> Iterator[None]:
    """datasets' progress bars off while the block runs, unless `shown` (or they are off already)."""
    if shown or not datasets.is_progress_bar_enabled():
        yield
        return
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        datasets.enable_progress_bars()


def pack_enough(
    rows: datasets.Dataset, tokenizer: PreTrainedTokenizerBase, source: SourceSpec, seq_len: int,
    num_proc: int | None, part: str, needed: int | None, vocab_size: int | None = None,
) -> tuple[datasets.Dataset, int]:
    """(packed rows, documents read): the first `portions` until they give `needed` x 1.1 rows (None: every one).

    A portion is tokenised by one `pack` call, cached on its own; its tail that fills no row is dropped. Documents
    as long as books take a portion or two, not the whole file; at most about twice the documents needed are read.
    """
    want = math.inf if needed is None else math.ceil(needed * _MARGIN)
    packed: list[datasets.Dataset] = []
    have = read = 0
    for start, end in portions(len(rows)):
        if have >= want:
            break
        small = end - start < _PACK_BATCH  # not worth a process pool, nor a progress bar of its own
        with _progress_bars(not small):
            packed.append(pack(rows.select(range(start, end)), tokenizer, source, seq_len, None if small else num_proc,
                               f"{part}, documents {start}-{end}", vocab_size))
        have, read = have + len(packed[-1]), end
    return (datasets.concatenate_datasets(packed) if len(packed) > 1 else packed[0]), read


def _pack_for(
    rows: Rows, tokenizer: PreTrainedTokenizerBase, source: SourceSpec, spec: DataSpec, part: str,
    needed: int | None, what: str, say: Callable[[str], None], vocab_size: int | None = None,
) -> Rows:
    """Map-style documents packed as far as `needed` rows need (`pack_enough`); streamed ones as they are read."""
    if not isinstance(rows, datasets.Dataset) or len(rows) == 0:
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
