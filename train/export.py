"""The final model: a save_pretrained folder (safetensors, config, tokenizer) with its provenance extended.

The converter writes `gqa_provenance.json` beside config.json; it is carried forward with an `uptraining`
section added (tokens, steps, fraction of the original pretraining, recipe). A model without one gets a fresh
file. The folder is written under a temporary name, fsynced and put in place when complete (`move_into_place`).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from accelerate import Accelerator
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from gqa_uptrain.provenance import (Provenance, Uptraining, read_provenance, unconverted_record, with_uptraining,
                                   write_provenance)
from gqa_uptrain.renames import move_into_place


def source_provenance(folder: Path) -> Provenance:
    """The provenance the converted model came with, or a fresh record naming it."""
    return read_provenance(folder) or unconverted_record(str(folder))


def plain_name(name: str) -> str:
    """A parameter's name without the `_orig_mod` levels that torch.compile wrappers add (regional compilation
    wraps every decoder layer, the embeddings and the head), as transformers' save_pretrained expects it."""
    return name.replace("._orig_mod.", ".").removeprefix("_orig_mod.")


def export_model(
    accelerator: Accelerator,
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    target: Path,
    provenance: Provenance,
    uptraining: Uptraining,
    dtype: torch.dtype | str | None,
    use_cache: bool | None = None,
) -> Provenance:
    """Write the trained model in the checkpoint's own `dtype`, tokenizer and provenance (all processes call this);
    returns the provenance record, which the main process writes (every process makes the same, but for the second
    of `finished_at`).

    `use_cache` is the source config's setting, which training turned off (`loop._load_model`): the exported config
    gets it back, or users who load the model would generate without a KV cache. None leaves the config as it is.
    """
    state_dict = accelerator.get_state_dict(model)  # gathers FSDP / ZeRO-3 shards on the main process
    dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype or torch.float32
    state_dict = {plain_name(name): t.to(dtype) if t.is_floating_point() else t for name, t in state_dict.items()}
    temp = target.with_name(f".incomplete-{target.name}")
    record = with_uptraining(provenance, uptraining)
    if accelerator.is_main_process:
        shutil.rmtree(temp, ignore_errors=True)
        unwrapped = accelerator.unwrap_model(model)
        if use_cache is not None:
            unwrapped.config.use_cache = use_cache
        unwrapped.save_pretrained(temp, state_dict=state_dict, safe_serialization=True)
        tokenizer.save_pretrained(temp)
        write_provenance(temp, record)
        move_into_place(temp, target, replace=True)
    accelerator.wait_for_everyone()
    return record
