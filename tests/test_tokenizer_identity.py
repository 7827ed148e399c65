"""One definition of "same tokenizer": tokenizers that share a vocabulary but split text differently are not."""

import json

from tokenizers import Tokenizer
from transformers import PreTrainedTokenizerFast

from gqa_uptrain.tokenizer_identity import tokenizer_difference, tokenizer_fingerprint


def with_merges(gpt2_tokenizer, keep) -> PreTrainedTokenizerFast:
    """GPT-2's tokenizer with its BPE merges filtered by `keep` (index -> bool): the vocabulary is unchanged."""
    spec = json.loads(gpt2_tokenizer.backend_tokenizer.to_str())
    spec["model"]["merges"] = [m for i, m in enumerate(spec["model"]["merges"]) if keep(i)]
    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(spec)),
                                   eos_token=gpt2_tokenizer.eos_token, bos_token=gpt2_tokenizer.bos_token)


def test_same_vocabulary_other_merges_is_another_tokenizer(gpt2_tokenizer):
    full = with_merges(gpt2_tokenizer, lambda i: True)
    fewer = with_merges(gpt2_tokenizer, lambda i: i % 50)
    assert full.get_vocab() == fewer.get_vocab()
    assert tokenizer_difference(full, with_merges(gpt2_tokenizer, lambda i: True)) is None
    assert tokenizer_difference(full, fewer) is not None
    assert tokenizer_fingerprint(full) != tokenizer_fingerprint(fewer)
