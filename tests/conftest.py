"""Shared fixtures: tiny random models built in-process with the real transformers classes."""

from pathlib import Path

import pytest
import torch
from transformers import GPT2TokenizerFast, LlamaConfig, LlamaForCausalLM

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The real text and tokenizer files that sit beside the project (../shared/data)."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"{SHARED_DATA} is missing")
    return SHARED_DATA


@pytest.fixture(scope="session")
def gpt2_tokenizer(shared_data: Path) -> GPT2TokenizerFast:
    tokenizer = GPT2TokenizerFast.from_pretrained(shared_data / "tokenizers" / "gpt2")
    tokenizer.model_max_length = 256
    return tokenizer


def save_tiny_llama(path: Path, tokenizer, kv_heads: int, seed: int = 0) -> Path:
    """A 2-layer Llama with 4 query heads and `kv_heads` KV heads, saved with its tokenizer."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=kv_heads, max_position_embeddings=256,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=False,
    )
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory, gpt2_tokenizer) -> Path:
    """A tiny multi-head-attention Llama checkpoint folder (4 KV heads)."""
    return save_tiny_llama(tmp_path_factory.mktemp("tiny-llama"), gpt2_tokenizer, kv_heads=4)


@pytest.fixture(scope="session")
def tiny_llama_gqa2(tmp_path_factory, gpt2_tokenizer) -> Path:
    """The same shape with 2 KV heads, as gqa-convert --groups 2 would write it."""
    return save_tiny_llama(tmp_path_factory.mktemp("tiny-llama-gqa2"), gpt2_tokenizer, kv_heads=2, seed=1)
