"""Small models made from scratch, for the demo and the GQA-paper reproduction.

A byte-level BPE tokenizer, a freshly initialised Llama, one run of gqa-uptrain's own loop from plain values
(pretraining and uptraining alike), and the pretraining written into the model's provenance: it is the 100% that
uptraining fractions refer to.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Iterable

from gqa_uptrain.provenance import pretraining_record, read_provenance, write_provenance

if TYPE_CHECKING:
    from gqa_uptrain.train import UptrainingResult

EOS = "<|endoftext|>"


def train_bpe_tokenizer(texts: Iterable[str], vocab_size: int, max_length: int, folder: Path) -> None:
    """Train a byte-level BPE on `texts` and save it as a transformers tokenizer (EOS doubles as BOS and pad)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    bpe.train_from_iterator(texts, trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token=EOS, eos_token=EOS, pad_token=EOS,
                                        model_max_length=max_length)
    tokenizer.save_pretrained(folder)


def init_llama(tokenizer_folder: Path, folder: Path, *, hidden: int, layers: int, heads: int, kv_heads: int,
               max_length: int, seed: int = 0) -> None:
    """A randomly initialised Llama with `heads` query and `kv_heads` KV heads, saved with its tokenizer."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_folder)
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=3 * hidden,
                         num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                         max_position_embeddings=max_length, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                         tie_word_embeddings=True)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def train_run(model: Path, output: Path, budget: dict, *, train_path: Path, seq_len: int, micro_batch: int,
              global_batch: int, lr: float, warmup: int, validation_path: Path | None = None,
              teacher: Path | None = None, every: int = 100, compile: bool = False) -> UptrainingResult:
    """One run of gqa-uptrain's loop; returns what `uptrain` does, the exported model folder as `model` (a finished
    run is not repeated).

    Validation uses `validation_path`, or else the first 64 documents of the training data.
    """
    validation = {"validation": {"path": str(validation_path)}} if validation_path else {"holdout_docs": 64}
    from gqa_uptrain.train import uptrain

    return uptrain({
        "output_dir": str(output), "seed": 0,
        "model": {"path": str(model), "compile": compile},
        **({"teacher": {"path": str(teacher), "weight": 0.5}} if teacher else {}),
        "data": {"train": {"path": str(train_path)}, **validation, "seq_len": seq_len},
        "batch": {"micro_batch": micro_batch, "global_batch": global_batch},
        "train": {"lr": lr, "warmup_steps": warmup, "weight_decay": 0.0},
        "budget": budget,
        "checkpoint": {"every": every, "keep": 1},
        "eval": {"every": every, "batches": 4},
        "log": {"every": max(1, every // 4), "trackers": []},
    })


def record_pretraining(run: UptrainingResult, source_id: str, data: str) -> int:
    """Replace the trained model's provenance by a pretraining record of `run`; returns the tokens it was trained
    on."""
    write_provenance(run.model, pretraining_record(source_id, run.tokens, run.steps, data))
    return run.tokens


def pretraining_tokens(model: Path) -> int:
    """The tokens `record_pretraining` wrote down for `model`."""
    return read_provenance(model)["pretraining"]["tokens"]
