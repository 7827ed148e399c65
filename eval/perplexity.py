"""Token-level perplexity on held-out text, by sliding window with a stride.

Every window sees up to `window` tokens; only the tokens not scored by an earlier window are scored, so each
token is scored exactly once, with at least `window - stride` tokens of context (except at the start of a
document). The text is tokenized once, by the base model's tokenizer, and the same ids are fed to every model.

BOS pitfall: the text is encoded without special tokens and each document gets exactly one start token in
front (the tokenizer's BOS, else its EOS, as lm-eval does). That start token is context only; it is never
scored. Encoding with special tokens and adding a start token again would score a doubled BOS.

Memory: the logits are never held for a whole batch (batch x window x vocabulary, 6 GB in fp32 for a 49k vocabulary
at batch 8 and window 4096). The model runs with `logits_to_keep=1` while a hook keeps the decoder's final hidden
states; the scored positions go through the model's LM head (and its logit scaling or soft-capping) at most
`chunk_tokens(vocab)` tokens at a time: `LOGITS_CHUNK_BYTES` (256 MiB) of fp32 logits, and at most three times that
alive at once (the head's output, its fp32 copy, the log-softmax), whatever the vocabulary and window. The first
batch checks that this path gives the model's own logits; a model whose head does something else is scored by
its plain forward pass instead (whole-batch logits, as before), with one line saying so.
"""

import math
import sys
from pathlib import Path

import datasets
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from gqa_uptrain.errors import DataError, one_line
from gqa_uptrain.source import looks_local

DATASET_FILE_BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}
LOGITS_CHUNK_BYTES = 256 * 2**20  # fp32 logits scored at once


def _builder(path: Path) -> str | None:
    """The `datasets` builder for a file (compressed files are named by their inner suffix), None for text."""
    suffixes = [s for s in path.suffixes if s not in (".xz", ".gz", ".bz2", ".zst")]
    return DATASET_FILE_BUILDERS.get(suffixes[-1]) if suffixes else None


def check_local_file(source: str) -> bool:
    """Whether SOURCE is a local file (True) or a Hub dataset name (False); DataError when it is written as a file
    (a path, or a file's suffix) but is none: checked before any model loads, by gqa-eval and gqa-pipeline."""
    path = Path(source)
    if path.is_file():
        return True
    if path.exists():
        raise DataError(f"perplexity data {source} is not a file")
    if looks_local(source) or path.suffix in (".txt", ".md", ".xz", ".gz") or _builder(path):
        raise DataError(f"perplexity data {source}: no such file")
    return False


def load_documents(source: str, column: str = "text", split: str = "test", concat: bool = False) -> list[str]:
    """Documents from a plain-text file (one document), a JSON/JSONL/CSV/Parquet file, or a Hub dataset.

    A Hub dataset is named `NAME` or `NAME:CONFIG` (e.g. `wikitext:wikitext-2-raw-v1`) and read from `split`.
    Each row is a document, unless `concat` joins the rows with newlines into one (for datasets that store a
    text line per row, such as wikitext).
    """
    path = Path(source)
    try:
        if check_local_file(source) and _builder(path) is None:
            documents = [path.read_text(encoding="utf-8")]
        else:
            if path.is_file():
                rows = datasets.load_dataset(_builder(path), data_files=str(path), split="train")
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


def chunk_tokens(vocab_size: int, budget_bytes: int = LOGITS_CHUNK_BYTES) -> int:
    """How many positions' fp32 logits fit in `budget_bytes` (at least one)."""
    return max(1, budget_bytes // (4 * vocab_size))


class ChunkedHead:
    """The model's own way from its final hidden states to logits, applied to a few positions at a time.

    Hidden states come from a forward hook on the decoder (`get_decoder()`), whose output is what the causal-LM
    head reads (after the final norm). Logits are the output embeddings (`get_output_embeddings()`) then what the
    causal-LM classes of transformers apply after them: Cohere's `logit_scale` (multiplied), Granite's
    `logits_scaling` (divided) and Gemma-2/3's `final_logit_softcapping` (cap x tanh(logits / cap)).
    `matches` checks the result against the model's own logits.
    """

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model
        self.head = model.get_output_embeddings()
        self.decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
        config = model.config.get_text_config(decoder=True)
        self.scale = getattr(config, "logit_scale", None)
        self.divisor = getattr(config, "logits_scaling", None)
        self.softcap = getattr(config, "final_logit_softcapping", None)
        self.vocab = getattr(self.head, "out_features", None) or getattr(config, "vocab_size", None)

    @property
    def usable(self) -> bool:
        found = self.head is not None and self.decoder is not None and self.decoder is not self.model
        return found and bool(self.vocab)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.head(hidden)
        if self.scale is not None:
            logits = logits * self.scale
        if self.divisor is not None:
            logits = logits / self.divisor
        if self.softcap is not None:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(final hidden states of every position, the model's own logits of the last position)."""
        captured = []
        hook = self.decoder.register_forward_hook(lambda module, args, output: captured.append(output[0]))
        try:
            out = self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, logits_to_keep=1)
        finally:
            hook.remove()
        return captured[-1], out.logits[:, -1]

    def matches(self, hidden: torch.Tensor, model_logits: torch.Tensor) -> bool:
        """Whether the last position's logits computed here are the model's own (to rounding of its dtype)."""
        ours = self.logits(hidden[:, -1:])[:, -1].float()
        theirs = model_logits.float().to(ours.device)
        tolerance = 1e-4 if model_logits.dtype == torch.float32 else 2e-2
        return ours.shape == theirs.shape and torch.allclose(ours, theirs, rtol=tolerance, atol=tolerance)


def _batch_tensors(batch: list[tuple[list[int], int]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(input ids, attention mask, labels: -100 except at the scored tokens) of a batch of windows, right-padded."""
    width = max(len(ids) for ids, _ in batch)
    input_ids = torch.zeros(len(batch), width, dtype=torch.long)
    labels = torch.full((len(batch), width), -100, dtype=torch.long)
    mask = torch.zeros(len(batch), width, dtype=torch.long)
    for row, (ids, n_scored) in enumerate(batch):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        mask[row, : len(ids)] = 1
        labels[row, len(ids) - n_scored : len(ids)] = torch.tensor(ids[len(ids) - n_scored :])
    return input_ids, mask, labels


def _chunked_nll(head: ChunkedHead, hidden: torch.Tensor, targets: torch.Tensor, chunk: int) -> float:
    """Summed negative log-likelihood of the scored positions, `chunk` positions' logits at a time."""
    scored = targets != -100
    states = hidden[:, :-1][scored.to(hidden.device)]
    wanted = targets[scored]
    nll = 0.0
    for begin in range(0, len(wanted), chunk):
        logits = head.logits(states[begin : begin + chunk]).float()
        nll += F.cross_entropy(logits, wanted[begin : begin + chunk].to(logits.device), reduction="sum").item()
    return nll


def _full_nll(model: torch.nn.Module, input_ids: torch.Tensor, mask: torch.Tensor, targets: torch.Tensor) -> float:
    """Summed negative log-likelihood from the model's plain forward pass (logits of the whole batch at once)."""
    logits = model(input_ids=input_ids, attention_mask=mask, use_cache=False).logits
    return F.cross_entropy(
        logits[:, :-1].flatten(0, 1).float(), targets.to(logits.device).flatten(), ignore_index=-100, reduction="sum"
    ).item()


@torch.no_grad()
def perplexity(
    model: torch.nn.Module, documents: list[list[int]], window: int, stride: int, batch_size: int,
    logits_chunk_bytes: int = LOGITS_CHUNK_BYTES,
) -> dict:
    """Total negative log-likelihood over every scored token, as perplexity and nats per token."""
    if not 0 < stride <= window:
        raise DataError(f"perplexity stride {stride} must be between 1 and the window ({window})")
    spans = [span for ids in documents for span in windows(ids, window, stride)]
    device = next(model.parameters()).device
    head = ChunkedHead(model)
    chunked, checked = head.usable, False
    chunk = chunk_tokens(head.vocab, logits_chunk_bytes) if chunked else 0
    nll, count = 0.0, 0
    for i in tqdm(range(0, len(spans), batch_size), desc="perplexity", unit="batch"):
        input_ids, mask, labels = _batch_tensors(spans[i : i + batch_size])
        input_ids, mask, targets = input_ids.to(device), mask.to(device), labels[:, 1:]
        if chunked:
            hidden, last_logits = head.forward(input_ids, mask)
            if not checked:  # the first batch: does the chunked path give the model's own logits?
                checked, chunked = True, head.matches(hidden, last_logits)
                if not chunked:
                    print(f"perplexity: {type(model).__name__}'s LM head is not the plain one gqa-eval scores in "
                          "chunks; scoring with whole-batch logits (more memory)", file=sys.stderr, flush=True)
        if chunked:
            nll += _chunked_nll(head, hidden, targets, chunk)
        else:
            nll += _full_nll(model, input_ids, mask, targets)
        count += int((targets != -100).sum())
    return {"token_perplexity": math.exp(nll / count), "nll_per_token": nll / count, "tokens": count}
