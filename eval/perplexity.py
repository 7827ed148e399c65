"""Token-level perplexity on held-out text, by sliding window with a stride.

Every window sees up to `window` tokens; only the tokens not scored by an earlier window are scored, so each
token is scored exactly once, with at least `window - stride` tokens of context (except at the start of a
document). The text is tokenized once, by the base model's tokenizer, and the same ids are fed to every model.

BOS pitfall: the text is encoded without special tokens and each document gets exactly one start token in
front (the tokenizer's BOS, else its EOS, as lm-eval does). That start token is context only; it is never
scored. Encoding with special tokens and adding a start token again would score a doubled BOS.
"""

import math
from pathlib import Path

import datasets
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from gqa_uptrain.errors import DataError, one_line

DATASET_FILE_BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}


def _builder(path: Path) -> str | None:
    """The `datasets` builder for a file (compressed files are named by their inner suffix), None for text."""
    suffixes = [s for s in path.suffixes if s not in (".xz", ".gz", ".bz2", ".zst")]
    return DATASET_FILE_BUILDERS.get(suffixes[-1]) if suffixes else None


def load_documents(source: str, column: str = "text", split: str = "test", concat: bool = False) -> list[str]:
    """Documents from a plain-text file (one document), a JSON/JSONL/CSV/Parquet file, or a Hub dataset.

    A Hub dataset is named `NAME` or `NAME:CONFIG` (e.g. `wikitext:wikitext-2-raw-v1`) and read from `split`.
    Each row is a document, unless `concat` joins the rows with newlines into one (for datasets that store a
    text line per row, such as wikitext).
    """
    path = Path(source)
    try:
        if path.is_file() and _builder(path) is None:
            documents = [path.read_text(encoding="utf-8")]
        else:
            if path.is_file():
                rows = datasets.load_dataset(_builder(path), data_files=str(path), split="train")
            elif path.exists():
                raise DataError(f"perplexity data {source} is not a file")
            elif path.suffix in (".txt", ".md", ".xz", ".gz") or _builder(path):
                raise DataError(f"perplexity data {source}: no such file")
            else:
                name, _, config = source.partition(":")
                rows = datasets.load_dataset(name, config or None, split=split)
            if column not in rows.column_names:
                raise DataError(f"perplexity data {source} has no column '{column}' (has {rows.column_names})")
            documents = rows[column]
    except DataError:
        raise
    except Exception as error:  # noqa: BLE001 - file, format and network errors all mean unusable data
        reason = one_line(error)
        raise DataError(f"perplexity data {source} does not load: {reason}") from error
    documents = [d for d in documents if isinstance(d, str) and d.strip()]
    if not documents:
        raise DataError(f"perplexity data {source} is empty")
    return ["\n".join(documents)] if concat else documents


def tokenize_documents(
    documents: list[str], tokenizer: PreTrainedTokenizerBase, max_tokens: int | None = None
) -> list[list[int]]:
    """Ids per document: one start token (never scored) then the text without special tokens."""
    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    prefix = [] if start is None else [start]
    encoded, total = [], 0
    for document in documents:
        ids = prefix + tokenizer(document, add_special_tokens=False)["input_ids"]
        if max_tokens is not None:
            ids = ids[: max(0, max_tokens - total)]
        if len(ids) > 1:
            encoded.append(ids)
            total += len(ids)
        if max_tokens is not None and total >= max_tokens:
            break
    if not encoded:
        raise DataError("the perplexity text has no token to score")
    return encoded


def windows(ids: list[int], window: int, stride: int) -> list[tuple[list[int], int]]:
    """(window ids, how many of its last tokens are newly scored), scoring each token at most once.

    With `stride < window` every token but the first is scored; with `stride == window` (disjoint windows)
    the first token of each window is not, having no context inside its window.
    """
    spans, scored_until = [], 1  # position 0 is the start token or the first word: nothing predicts it
    for begin in range(0, len(ids), stride):
        end = min(begin + window, len(ids))
        if end > scored_until:  # a window's first token has nothing before it in the window to predict it
            spans.append((ids[begin:end], min(end - scored_until, end - begin - 1)))
            scored_until = end
        if end == len(ids):
            break
    return spans


@torch.no_grad()
def perplexity(
    model: torch.nn.Module, documents: list[list[int]], window: int, stride: int, batch_size: int
) -> dict:
    """Total negative log-likelihood over every scored token, as perplexity and nats per token."""
    if not 0 < stride <= window:
        raise DataError(f"perplexity stride {stride} must be between 1 and the window ({window})")
    spans = [span for ids in documents for span in windows(ids, window, stride)]
    device = next(model.parameters()).device
    nll, count = 0.0, 0
    for i in tqdm(range(0, len(spans), batch_size), desc="perplexity", unit="batch"):
        batch = spans[i : i + batch_size]
        width = max(len(ids) for ids, _ in batch)
        input_ids = torch.zeros(len(batch), width, dtype=torch.long)
        labels = torch.full((len(batch), width), -100, dtype=torch.long)
        mask = torch.zeros(len(batch), width, dtype=torch.long)
        for row, (ids, n_scored) in enumerate(batch):
            input_ids[row, : len(ids)] = torch.tensor(ids)
            mask[row, : len(ids)] = 1
            labels[row, len(ids) - n_scored : len(ids)] = torch.tensor(ids[len(ids) - n_scored :])
        logits = model(input_ids=input_ids.to(device), attention_mask=mask.to(device)).logits
        targets = labels[:, 1:].to(device)
        nll += F.cross_entropy(
            logits[:, :-1].flatten(0, 1).float(), targets.flatten(), ignore_index=-100, reduction="sum"
        ).item()
        count += int((targets != -100).sum())
    return {"token_perplexity": math.exp(nll / count), "nll_per_token": nll / count, "tokens": count}
