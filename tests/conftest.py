"""Shared fixtures: the small real data the tests read (tests/data), GPT-2's tokenizer rebuilt from it, and tiny
random models built in-process with the real transformers classes. Nothing here reads beyond the repository."""

import json
import lzma
from pathlib import Path

import pytest
from tiny_models import small_llama
from transformers import GPT2TokenizerFast
from transformers.convert_slow_tokenizer import bytes_to_unicode

DATA = Path(__file__).resolve().parent / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The real text the tests share, shipped in tests/data (its README says where each file comes from)."""
    return DATA


def gpt2_vocab(merges: list[str]) -> dict[str, int]:
    """GPT-2's vocabulary, which its merges determine: the 256 byte symbols, one token per merge in merge order,
    then <|endoftext|>."""
    symbols = [*bytes_to_unicode().values(), *("".join(merge.split()) for merge in merges), "<|endoftext|>"]
    return {symbol: i for i, symbol in enumerate(symbols)}


@pytest.fixture(scope="session")
def gpt2_tokenizer(tmp_path_factory) -> GPT2TokenizerFast:
    """GPT-2's tokenizer (50,257 tokens, <|endoftext|> as BOS and EOS), loaded from a folder as a user's is."""
    folder = tmp_path_factory.mktemp("gpt2")
    with lzma.open(DATA / "gpt2-merges.txt.xz", "rt", encoding="utf-8") as file:
        merges = file.read()
    (folder / "merges.txt").write_text(merges, encoding="utf-8")
    vocab = gpt2_vocab([line for line in merges.splitlines()[1:] if line])  # after the "#version" line
    (folder / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    tokenizer = GPT2TokenizerFast.from_pretrained(folder)
    tokenizer.model_max_length = 256
    return tokenizer


def save_tiny_llama(path: Path, tokenizer, kv_heads: int, seed: int = 0) -> Path:
    """A 2-layer Llama with 4 query heads and `kv_heads` KV heads, saved with its tokenizer."""
    model = small_llama(kv_heads, layers=2, vocab=len(tokenizer), seed=seed, hidden_size=64, intermediate_size=128,
                        max_position_embeddings=256, bos_token_id=tokenizer.bos_token_id,
                        eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=False)
    model.save_pretrained(path)
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
