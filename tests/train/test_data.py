"""Data: documents packed into full sequences with EOS between them, seeded order, exact resume position."""

import json
import os

import datasets
import pytest
import torch
from accelerate import Accelerator

from gqa_uptrain.errors import DataError
from gqa_uptrain.train.data import Batches, build_datasets, portions, train_loader
from gqa_uptrain.train.recipe import DataSpec

DOCS = [f"Document number {i} says something about {'many ' * (i % 7)}things." for i in range(60)]


def spec(path, seq_len=16, **extra) -> DataSpec:
    return DataSpec(train={"path": str(path)}, holdout_docs=6, seq_len=seq_len, **extra)  # a tenth of DOCS


@pytest.fixture
def jsonl(tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": doc, "id": i}) + "\n" for i, doc in enumerate(DOCS)))
    return path


def packed_by_portions(docs: list[str], tokenizer, seq_len: int) -> list[list[int]]:
    """Rows as packing makes them: each portion's documents joined with EOS and cut, its tail that fills no row
    dropped."""
    rows = []
    for start, end in portions(len(docs)):
        stream = [t for doc in docs[start:end] for t in tokenizer(doc)["input_ids"] + [tokenizer.eos_token_id]]
        rows += [stream[i : i + seq_len] for i in range(0, len(stream) - seq_len + 1, seq_len)]
    return rows


def test_documents_are_packed_with_eos_and_without_padding(jsonl, gpt2_tokenizer):
    train, val = build_datasets(spec(jsonl), gpt2_tokenizer, seed=0)
    rows = [row["input_ids"].tolist() for row in train]
    assert all(len(row) == 16 for row in rows) and len(rows) > 20
    assert rows == packed_by_portions(DOCS[6:], gpt2_tokenizer, 16)
    assert [row["input_ids"].tolist() for row in val] == packed_by_portions(DOCS[:6], gpt2_tokenizer, 16)


def test_parquet_text_and_pretokenised_sources(tmp_path, gpt2_tokenizer):
    datasets.Dataset.from_dict({"text": DOCS}).to_parquet(tmp_path / "docs.parquet")
    (tmp_path / "docs.txt").write_text("\n\n".join(DOCS))
    ids = [gpt2_tokenizer(doc)["input_ids"] for doc in DOCS]
    datasets.Dataset.from_dict({"input_ids": ids}).to_parquet(tmp_path / "ids.parquet")
    names = ("docs.parquet", "docs.txt", "ids.parquet")
    packed = [build_datasets(spec(tmp_path / name), gpt2_tokenizer, 0)[0] for name in names]
    as_lists = [[row["input_ids"].tolist() for row in rows] for rows in packed]
    assert as_lists[0] == as_lists[1] == as_lists[2] and len(as_lists[0]) > 10


@pytest.mark.slow
def test_tokenised_rows_are_reused_across_tokenizer_folders(jsonl, gpt2_tokenizer, tmp_path):
    """A converted model's tokenizer is a copy in a new folder: its run must not tokenise the corpus again."""
    copy = tmp_path / "copy"
    gpt2_tokenizer.save_pretrained(copy)
    changed = tmp_path / "changed"
    gpt2_tokenizer.save_pretrained(changed)
    changed_tokenizer = type(gpt2_tokenizer).from_pretrained(changed)
    changed_tokenizer.add_tokens(["something"])

    def cache_file(tokenizer, seq_len=16):
        train, _ = build_datasets(spec(jsonl, seq_len=seq_len), tokenizer, seed=0)
        return train.cache_files[0]["filename"]

    first = cache_file(gpt2_tokenizer)
    assert cache_file(type(gpt2_tokenizer).from_pretrained(copy)) == first
    assert cache_file(changed_tokenizer) != first
    assert cache_file(gpt2_tokenizer, seq_len=8) != first


def test_changed_data_or_holdout_is_packed_again(jsonl, gpt2_tokenizer):
    """The packed cache is named by the prepared data files and the slice taken: neither may be mixed up."""
    def packed(holdout_docs=6):
        data = DataSpec(train={"path": str(jsonl)}, holdout_docs=holdout_docs, seq_len=16)
        train, val = build_datasets(data, gpt2_tokenizer, seed=0)
        return train.cache_files[0]["filename"], val.cache_files[0]["filename"], train[0]["input_ids"].tolist()

    train_file, val_file, first_row = packed()
    assert train_file != val_file and packed() == (train_file, val_file, first_row)
    assert packed(holdout_docs=3)[:2] != (train_file, val_file)
    jsonl.write_text("".join(json.dumps({"text": doc.upper()}) + "\n" for doc in DOCS))
    os.utime(jsonl, (jsonl.stat().st_atime, jsonl.stat().st_mtime + 10))
    again = packed()
    assert again[0] != train_file and again[2] != first_row


def test_streaming_gives_full_rows_in_a_seeded_order(jsonl, gpt2_tokenizer):
    def rows(seed):
        train, _ = build_datasets(spec(jsonl, streaming=True, shuffle_buffer=8), gpt2_tokenizer, seed)
        return [row["input_ids"].tolist() for row in train]

    first, again, other = rows(1), rows(1), rows(2)
    assert first == again != other
    assert all(len(row) == 16 for row in first)


def test_empty_dataset_is_refused(tmp_path, gpt2_tokenizer):
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(DataError):
        build_datasets(spec(tmp_path / "empty.jsonl"), gpt2_tokenizer, 0)
    (tmp_path / "short.jsonl").write_text("".join(json.dumps({"text": "hi"}) + "\n" for _ in range(12)))
    with pytest.raises(DataError, match="not one full sequence"):
        build_datasets(spec(tmp_path / "short.jsonl"), gpt2_tokenizer, 0)


def test_missing_files_and_columns_are_refused(tmp_path, jsonl, gpt2_tokenizer):
    with pytest.raises(DataError, match="matches no file"):
        build_datasets(spec(tmp_path / "nope*.jsonl"), gpt2_tokenizer, 0)
    with pytest.raises(DataError, match="no 'body' column"):
        body = DataSpec(train={"path": str(jsonl), "text_field": "body"}, seq_len=16, holdout_docs=1)
        build_datasets(body, gpt2_tokenizer, 0)


@pytest.mark.parametrize("streaming", [False, True], ids=["map-style", "streaming"])
def test_batches_resume_exactly_where_they_stopped(jsonl, gpt2_tokenizer, fresh_accelerate, streaming):
    accelerator = Accelerator(cpu=True)
    train, _ = build_datasets(spec(jsonl, streaming=streaming, shuffle_buffer=16), gpt2_tokenizer, 0)

    def loader():
        from accelerate.utils import DataLoaderConfiguration

        accelerator.dataloader_config = DataLoaderConfiguration(use_seedable_sampler=True, data_seed=3)
        return accelerator.prepare(train_loader(train, 2))

    uninterrupted = Batches(accelerator, loader())
    expected = [next(uninterrupted)["input_ids"] for _ in range(45)]  # several epochs (20 batches each)
    assert uninterrupted.epoch >= 2
    first = Batches(accelerator, loader())
    seen = [next(first)["input_ids"] for _ in range(23)]
    resumed = Batches(accelerator, loader(), **first.state())
    seen += [next(resumed)["input_ids"] for _ in range(22)]
    assert all(torch.equal(a, b) for a, b in zip(expected, seen))
    assert not torch.equal(expected[0], next(Batches(accelerator, loader(), epoch=1))["input_ids"])


def test_the_holdout_never_takes_the_training_data(tmp_path, gpt2_tokenizer):
    """The default holdout_docs (200) on a 148-document file: a tenth is held out, and one line says so."""
    path = tmp_path / "small.jsonl"
    path.write_text("".join(json.dumps({"text": f"{doc} {i}"}) + "\n" for i, doc in enumerate((DOCS * 3)[:148])))
    said = []
    train, val = build_datasets(DataSpec(train={"path": str(path)}, seq_len=16), gpt2_tokenizer, 0, say=said.append)
    assert len(said) == 1 and "holding out 14 of 148 documents" in said[0] and "holdout_docs=200" in said[0]
    held_out = [f"{(DOCS * 3)[i]} {i}" for i in range(14)]
    assert ids(val) == packed_by_portions(held_out, gpt2_tokenizer, 16)
    assert len(train) > 5 * len(val)
    with pytest.raises(DataError, match="once 14 documents are held out"):
        build_datasets(DataSpec(train={"path": str(path)}, seq_len=4096), gpt2_tokenizer, 0, say=said.append)


def ids(rows) -> list[list[int]]:
    return [row["input_ids"].tolist() for row in rows]


def counting_tokenizer(monkeypatch, tokenizer) -> list[int]:
    """How many documents each call gives `tokenizer` from now on (pack sends lists; other strings are not counted)."""
    tokenised = []
    call = type(tokenizer).__call__

    def counting(self, text, *args, **kwargs):
        if isinstance(text, list):
            tokenised.append(len(text))
        return call(self, text, *args, **kwargs)

    monkeypatch.setattr(type(tokenizer), "__call__", counting)
    return tokenised


def test_portions_double_up_to_a_map_batch_and_never_depend_on_the_budget():
    assert list(portions(10)) == [(0, 1), (1, 3), (3, 7), (7, 10)]
    ends = [end for _, end in portions(5000)]
    assert ends[:11] == [1, 3, 7, 15, 31, 63, 127, 255, 511, 1023, 2023] and ends[-1] == 5000


@pytest.mark.slow
def test_only_the_documents_the_budget_reads_are_tokenised(tmp_path, gpt2_tokenizer, monkeypatch):
    path = tmp_path / "large.jsonl"
    path.write_text("".join(json.dumps({"text": f"{DOCS[i % 60]} ({i})"}) + "\n" for i in range(8000)))
    data = DataSpec(train={"path": str(path)}, holdout_docs=100, seq_len=16)
    full_train, full_val = build_datasets(data, gpt2_tokenizer, 0)

    tokenised = counting_tokenizer(monkeypatch, gpt2_tokenizer)
    path.touch()  # a new modification time: datasets prepares the file again, and nothing is found cached
    os.utime(path, (path.stat().st_atime, path.stat().st_mtime + 10))
    said = []
    train, val = build_datasets(data, gpt2_tokenizer, 0, train_rows=4, val_rows=2, say=said.append)  # one step
    read = int(said[0].split()[4])
    assert sum(tokenised) <= 2 * read and read < 30  # a few portions of training documents, and as few held out
    assert said[0] == (f"data: tokenised the first {read:,} of 7,900 training documents, {len(train):,} sequences "
                       "for the 4 the run reads")
    assert said[1].startswith("data: tokenised the first ") and " of 100 validation documents" in said[1]
    assert 4 <= len(train) < len(full_train) and 2 <= len(val) < len(full_val)
    assert ids(train) == ids(full_train)[: len(train)] and ids(val) == ids(full_val)[: len(val)]

    # A budget past the first portions: portions until it is covered, still the first rows of the whole packing.
    tokenised.clear()
    more, _ = build_datasets(data, gpt2_tokenizer, 0, train_rows=len(full_train) // 2, val_rows=2, say=said.append)
    assert len(full_train) // 2 <= len(more) < len(full_train) and sum(tokenised) < 7900 - read
    assert ids(more) == ids(full_train)[: len(more)]


def test_a_short_run_on_books_tokenises_a_book_and_a_rerun_none(tmp_path, gpt2_tokenizer, monkeypatch):
    """Issue 24: 10,240 tokens from 138 books tokenised all of them. Now one book covers the budget, and the same run
    again (or one with a smaller budget) finds it cached."""
    books = [" ".join(f"{DOCS[(b + i) % 60]}" for i in range(300)) for b in range(40)]  # about 3,500 tokens each
    path = tmp_path / "books.jsonl"
    path.write_text("".join(json.dumps({"text": book}) + "\n" for book in books))
    data = DataSpec(train={"path": str(path)}, holdout_docs=4, seq_len=64)
    tokenised = counting_tokenizer(monkeypatch, gpt2_tokenizer)
    said = []
    first = build_datasets(data, gpt2_tokenizer, 0, train_rows=20, val_rows=2, say=said.append)  # 1,280 tokens
    assert tokenised == [1, 1]  # the first training book, the first held-out one
    assert said[-2].startswith("data: tokenised the first 1 of 36 training documents")
    tokenised.clear()
    again = build_datasets(data, gpt2_tokenizer, 0, train_rows=20, val_rows=2, say=said.append)
    smaller = build_datasets(data, gpt2_tokenizer, 0, train_rows=5, val_rows=1, say=said.append)
    assert tokenised == [] and ids(again[0]) == ids(first[0]) and ids(smaller[0]) == ids(first[0])
