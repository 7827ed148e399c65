"""Load the models and tokenizers to compare, turning every way that can fail into one error naming the model."""

from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PretrainedConfig, PreTrainedTokenizerBase

from gqa_uptrain.errors import CheckpointError, TokenizerMismatchError, one_line
from gqa_uptrain.provenance import read_provenance
from gqa_uptrain.source import could_be_hub_id
from gqa_uptrain.tokenizer_identity import tokenizer_difference


@dataclass
class OpenedModel:
    """A model named on the command line, with what can be read without loading its weights."""

    ref: str  # a local folder or a Hugging Face Hub id, as the user wrote it
    label: str  # a short unique name for tables and plots
    config: PretrainedConfig
    tokenizer: PreTrainedTokenizerBase
    provenance: dict | None  # gqa_provenance.json written by gqa-convert, when present


def open_model(ref: str, label: str) -> OpenedModel:
    """Read a model's config and tokenizer (cheap), so bad input is found before any long evaluation."""
    path = Path(ref)
    if path.exists() and not (path / "config.json").is_file():
        raise CheckpointError(f"model {ref}: no config.json in {path}")
    if not path.exists() and not could_be_hub_id(ref):
        raise CheckpointError(f"model {ref}: no such folder, and not a Hugging Face Hub id")
    try:
        config = AutoConfig.from_pretrained(ref)
    except Exception as error:  # noqa: BLE001 - any failure here means this model cannot be loaded
        raise CheckpointError(f"model {ref} does not load: {one_line(error)}") from error
    try:
        tokenizer = AutoTokenizer.from_pretrained(ref)
    except Exception as error:  # noqa: BLE001
        raise CheckpointError(f"model {ref}: its tokenizer does not load: {one_line(error)}") from error
    return OpenedModel(ref=ref, label=label, config=config, tokenizer=tokenizer, provenance=read_provenance(path))


def load_weights(spec: OpenedModel, dtype: torch.dtype, device: str) -> torch.nn.Module:
    """The model in eval mode, loaded straight onto `device` (`auto`: spread over the GPUs by accelerate).

    The same dtype is used for the base and every candidate.
    """
    try:
        model = AutoModelForCausalLM.from_pretrained(spec.ref, dtype=dtype, device_map=device)
    except Exception as error:  # noqa: BLE001 - any failure here means this model cannot be loaded
        raise CheckpointError(f"model {spec.ref} does not load: {one_line(error)}") from error
    return model.eval()


def check_same_tokenizer(base: OpenedModel, candidates: list[OpenedModel]) -> None:
    """Refuse to compare models whose tokenizers differ: their log-likelihoods would measure different things."""
    for candidate in candidates:
        differs = tokenizer_difference(base.tokenizer, candidate.tokenizer)
        if differs is None:
            continue
        raise TokenizerMismatchError(
            f"candidate {candidate.ref} has a different tokenizer from base {base.ref} ({differs} differs)"
        )


def adds_bos(tokenizer: PreTrainedTokenizerBase) -> bool:
    """Whether the tokenizer puts a BOS token in front of plain text by default."""
    ids = tokenizer("a")["input_ids"]
    return tokenizer.bos_token_id is not None and len(ids) > 0 and ids[0] == tokenizer.bos_token_id
