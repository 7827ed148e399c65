"""A distillation teacher that shares the student's frozen body: one copy of the embeddings, norms and MLPs.

With `train.trainable: attention`, the student's body is frozen and, when the teacher is the model it was converted
from, equal to the teacher's. The teacher is then built around the student's own modules: its decoder layers hold the
student's norms and MLPs (the very module objects) and attention modules of their own, loaded with the original
attention weights; its embeddings, final norm, rotary table and head are the student's. Only the original attention
weights are new memory (on Llama-2-7B: 4.3 GB in bf16 instead of a whole 13.5 GB teacher).

Sharing is decided by content, never by name: every frozen parameter of the student must equal, bit for bit, the
tensor of the same name in the teacher's checkpoint, and the configs may differ in the KV-head count alone.
Anything else raises `NotShared` with the reason, and the caller places a separate teacher instead. Sharing needs the
student's modules whole on the device, so it is for one GPU and DDP; under FSDP2 and ZeRO-3 a decoder layer's
parameters exist only while the layer's own forward gathers them, and the teacher is placed on its own.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn
from transformers import AutoModelForCausalLM, PretrainedConfig

from gqa_uptrain.kv_heads import with_kv_heads
from gqa_uptrain.model_folder import require_inside

from .trainable import attention_modules


class NotShared(Exception):
    """Why the teacher cannot share the student's body (said in one line; a separate teacher is placed)."""


def _stored_tensors(folder: Path) -> Iterator[tuple[str, Callable[[], torch.Tensor]]]:
    """(name, loader) of every tensor in a safetensors checkpoint folder, one file open at a time."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        require_inside(folder, index)
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        files = ["model.safetensors"]
    for name in files:
        path = folder / name
        if not path.is_file():
            raise NotShared(f"the teacher has no safetensors weights ({path.name} is missing)")
        require_inside(folder, path)
        with safe_open(path, framework="pt") as stored:
            for key in stored.keys():
                yield key, lambda key=key, stored=stored: stored.get_tensor(key)


def _check_configs(student: PretrainedConfig, teacher: PretrainedConfig) -> None:
    mine = with_kv_heads(student, teacher.num_key_value_heads or teacher.num_attention_heads).to_dict()
    theirs = teacher.to_dict()
    ignored = {"dtype", "torch_dtype", "use_cache", "_name_or_path", "transformers_version", "architectures",
               "_attn_implementation_autoset"}
    differs = sorted(key for key in mine.keys() | theirs.keys()
                     if key not in ignored and mine.get(key) != theirs.get(key))
    if differs:
        raise NotShared(f"its config differs from the student's beyond the KV heads ({', '.join(differs[:3])})")


def _graft(teacher: nn.Module, student: nn.Module, attention: set[str], prefix: str = "") -> None:
    """Put the student's modules into `teacher` everywhere except the attention modules (named in `attention`)."""
    for name, child in list(teacher.named_children()):
        path = f"{prefix}{name}"
        if path in attention:
            continue
        mine = getattr(student, name, None)
        if mine is None or type(mine) is not type(child):
            raise NotShared(f"the student has no module {path} of type {type(child).__name__}")
        if any(a.startswith(path + ".") for a in attention):
            _graft(child, mine, attention, path + ".")
        else:
            setattr(teacher, name, mine)


def shared_body_teacher(student: nn.Module, folder: Path, config: PretrainedConfig, attn_implementation: str,
                        device: torch.device) -> nn.Module:
    """The teacher in `folder` built around `student`'s frozen modules; NotShared when its body is not the student's
    (see the module docstring). Its own attention is frozen and in eval mode; the shared modules keep the student's
    mode (decoder bodies have no dropout outside attention)."""
    _check_configs(student.config, config)
    with torch.device("meta"):
        teacher = AutoModelForCausalLM.from_config(config, attn_implementation=attn_implementation)
    attention = {name for name, _ in attention_modules(teacher)}
    if not attention:
        raise NotShared(f"{type(teacher).__name__} has no attention modules to tell apart from its body")
    _graft(teacher, student, attention)
    body = {name: p for name, p in student.named_parameters() if not p.requires_grad}
    dtype = next(iter(body.values())).dtype if body else torch.float32
    for _, module in attention_modules(teacher):
        module.to_empty(device=device)
    own = {f"{name}.{key}": p for name, module in attention_modules(teacher) for key, p in module.named_parameters()}
    seen = set()
    with torch.no_grad():
        for key, load in _stored_tensors(folder):
            if key in own:
                own[key].copy_(load().to(dtype))
                seen.add(key)
            elif key in body:
                if not torch.equal(load().to(device=body[key].device, dtype=body[key].dtype), body[key]):
                    raise NotShared(f"its {key} differs from the student's")
                seen.add(key)
    missing = sorted((own.keys() | body.keys()) - seen)
    if missing:
        raise NotShared(f"its checkpoint has no {missing[0]}" + (f" (and {len(missing) - 1} more)" if len(missing) > 1
                                                                   else ""))
    left = [name for name, t in (*teacher.named_parameters(), *teacher.named_buffers()) if t.is_meta]
    if left:
        raise NotShared(f"its {left[0]} belongs neither to its attention nor to the student's body")
    teacher.config.use_cache = False
    for _, module in attention_modules(teacher):
        module.eval().requires_grad_(False)
    return teacher
