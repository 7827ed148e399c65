"""AdamW (fused on GPUs) with decoupled weight decay on matrices only, and warmup-then-decay schedules."""

from __future__ import annotations

import math

import torch
from torch.optim.lr_scheduler import LambdaLR

from .recipe import TrainSpec


def _dims(parameter: torch.Tensor) -> int:
    """A parameter's true dimensionality. Under DeepSpeed ZeRO-3's partitioned construction a parameter is an empty
    placeholder of shape (0,) and its shape is `ds_shape`: read naively, every matrix would look like a norm."""
    return len(getattr(parameter, "ds_shape", parameter.shape))


def build_optimizer(model: torch.nn.Module, spec: TrainSpec) -> torch.optim.AdamW:
    """Weight decay on weight matrices and embeddings; none on norms and biases (as GPT-2/Llama training did).

    An empty group is left out: DeepSpeed drops it, and the schedule would then have one learning rate too many.
    """
    trainable = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in trainable if _dims(p) >= 2], "weight_decay": spec.weight_decay},
        {"params": [p for p in trainable if _dims(p) < 2], "weight_decay": 0.0},
    ]
    groups = [group for group in groups if group["params"]]
    return torch.optim.AdamW(
        groups, lr=spec.lr, betas=spec.betas, eps=spec.eps, fused=torch.cuda.is_available() or None
    )


def lr_multiplier(step: int, spec: TrainSpec, total_steps: int) -> float:
    """Linear warmup to the peak over `warmup_steps`, then cosine / linear decay to `min_lr_ratio`, or constant."""
    if step < spec.warmup_steps:
        return (step + 1) / spec.warmup_steps
    if spec.schedule == "constant":
        return 1.0
    progress = min(1.0, (step - spec.warmup_steps) / max(1, total_steps - spec.warmup_steps))
    decay = 0.5 * (1.0 + math.cos(math.pi * progress)) if spec.schedule == "cosine" else 1.0 - progress
    return spec.min_lr_ratio + (1.0 - spec.min_lr_ratio) * decay


def build_schedule(optimizer: torch.optim.Optimizer, spec: TrainSpec, total_steps: int) -> LambdaLR:
    return LambdaLR(optimizer, lambda step: lr_multiplier(step, spec, total_steps))
