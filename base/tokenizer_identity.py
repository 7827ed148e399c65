"""When two tokenizers are the same one: the single definition that distillation (gqa-uptrain's teacher), comparison
(gqa-eval's base and candidates) and the tokenised-data cache all rely on.

Two tokenizers are the same when they agree on everything that decides how text becomes ids and ids become text:
the vocabulary (added tokens included), the special tokens, the backend's full description (normaliser,
pre-tokeniser, model, post-processor, decoder) where there is one, and the encoding of a probe text that exercises
whitespace, digits, punctuation, case and non-ASCII.
"""

from __future__ import annotations

import hashlib
import json

from transformers import PreTrainedTokenizerBase

PROBE = "Hello  world!\n\tIt's 2026: naïve café, 3.14159 and 東京.  "


def tokenizer_signature(tokenizer: PreTrainedTokenizerBase) -> dict[str, object]:
    """Each part of what makes a tokenizer, by the name an error message gives it."""
    return {
        "vocabulary": sorted(tokenizer.get_vocab().items()),
        "special tokens": [[tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id],
                           list(tokenizer.all_special_tokens)],
        "backend": _backend(tokenizer),
        "tokenization of a probe text": list(tokenizer(PROBE)["input_ids"]),
    }


def _backend(tokenizer: PreTrainedTokenizerBase) -> dict | None:
    """The fast tokenizer's own description, without truncation and padding: transformers sets and clears those on
    every call, so they say how it was last called, not what it is. None for tokenizers without a backend."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return None
    description = json.loads(backend.to_str())
    description.pop("truncation", None)
    description.pop("padding", None)
    return description


def tokenizer_difference(a: PreTrainedTokenizerBase, b: PreTrainedTokenizerBase) -> str | None:
    """None when `a` and `b` are the same tokenizer, else the first part in which they differ."""
    first, second = tokenizer_signature(a), tokenizer_signature(b)
    return next((part for part in first if first[part] != second[part]), None)


def tokenizer_fingerprint(tokenizer: PreTrainedTokenizerBase) -> str:
    """A hash of the signature: equal for the same tokenizer wherever it was loaded from."""
    return hashlib.sha256(json.dumps(tokenizer_signature(tokenizer)).encode()).hexdigest()
