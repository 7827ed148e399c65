"""Models are opened cheaply and checked against each other before any evaluation."""

import pytest

from gqa_uptrain.errors import CheckpointError, TokenizerMismatchError
from gqa_uptrain.eval.loading import adds_bos, check_same_tokenizer, open_model


def test_identical_tokenizers_pass(tiny_llama, tiny_llama_gqa2):
    """Two folders holding the same tokenizer (and other weights) are comparable: the check compares content."""
    base, candidate = open_model(str(tiny_llama), "base"), open_model(str(tiny_llama_gqa2), "gqa2")
    assert base.tokenizer is not candidate.tokenizer and base.tokenizer.name_or_path != candidate.tokenizer.name_or_path
    assert check_same_tokenizer(base, [candidate, candidate]) is None  # no TokenizerMismatchError
    text = "Hello  world!\n\tIt's 2026: naïve café, 3.14159 and 東京."
    assert base.tokenizer(text)["input_ids"] == candidate.tokenizer(text)["input_ids"]


def test_tokenizer_with_other_special_tokens_is_refused(tiny_llama, tiny_llama_gqa2):
    base, candidate = open_model(str(tiny_llama), "base"), open_model(str(tiny_llama_gqa2), "gqa2")
    candidate.tokenizer.add_special_tokens({"bos_token": "<s>"})
    with pytest.raises(TokenizerMismatchError, match=f"candidate {tiny_llama_gqa2} .*differs"):
        check_same_tokenizer(base, [candidate])


def test_folder_without_config_is_named(tmp_path):
    with pytest.raises(CheckpointError, match=f"model {tmp_path}: no config.json"):
        open_model(str(tmp_path), "x")


def test_adds_bos(gpt2_tokenizer):
    assert not adds_bos(gpt2_tokenizer)
    assert adds_bos(gpt2_tokenizer.__class__.from_pretrained(gpt2_tokenizer.name_or_path, add_bos_token=True))
