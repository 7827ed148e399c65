"""Layer-wise refinement: after the closed form, gradient descent on one converted layer's q/k/v/o so that, fed the
converted model's own hidden states, the layer reproduces the original layer's output on the calibration text.

Why, after a closed form: the closed form fits each projection to second-order statistics and one softmax
temperature per head; it cannot follow the softmax beyond that, nor see the drift that earlier converted layers left
in the hidden states. Gradient descent on the layer itself sees both.

The objective (`OBJECTIVE`) is the whole decoder layer's output, MLP included and frozen: the attention then also
learns to cancel drift in the residual stream, which matching the attention block's own output cannot do. Both
were measured on the real model (docs/experiments/calibrated-refinement.md); the layer's output won.

Held-out calibration sequences (every `held_out_share`-th) decide: the weights kept are those of the step with the
lowest held-out error, checked every `CHECK_EVERY` steps, and the closed form is kept when no step beats it.
Training stops early after `PATIENCE` checks without a new best.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from gqa_uptrain.convert.calibration.fused import FUSED_LAYOUTS, QKV
from gqa_uptrain.convert.calibration.layers import (OUTPUT_PROJECTIONS, _Stop, attention_name, attention_of,
                                                    layer_output, output_projection)

PROJECTIONS = (*QKV, *FUSED_LAYOUTS, *OUTPUT_PROJECTIONS)
OBJECTIVE: Literal["layer", "attention"] = "layer"
LEARNING_RATE = 3e-4  # Adam; on the real model (layers 0-2, 100 steps) it beat 1e-4 on every layer
CHECK_EVERY = 25
PATIENCE = 4
EXACT = 1e-6  # a held-out error below this is the closed form being exact: nothing to refine


@dataclass(frozen=True)
class Refinement:
    """What the refinement of one layer did. Errors are held-out relative errors of the objective: for the layer's
    output sqrt(sum |prediction - target|^2 / sum |target - input|^2), what is missed against what passing the
    converted input through unchanged would miss; for the attention output, against the target's own size."""

    steps: int  # optimizer steps behind the kept weights; 0: the closed form was kept
    error_before: float
    error_after: float

    def record(self) -> dict:
        return {"steps": self.steps, "held_out_error_before": recorded(self.error_before),
                "held_out_error_after": recorded(self.error_after)}


def recorded(error: float) -> float | None:
    """A held-out error as the provenance records it (None where none was measured)."""
    return None if math.isnan(error) else round(error, 5)


def refine_layer(layer: nn.Module, inputs: torch.Tensor, targets: torch.Tensor, kwargs: dict, batch: int,
                 steps: int, held_out_share: int) -> Refinement:
    """Refine `layer`'s attention projections in place. inputs: [N, T, D] the converted model's hidden states at
    the layer; targets: [N, T, D] what the original layer gave on the original hidden states (its output, or its
    attention block's output without o_proj's bias, as `OBJECTIVE` says)."""
    held = [s for s in range(inputs.shape[0]) if s % held_out_share == held_out_share - 1]
    fit = [s for s in range(inputs.shape[0]) if s % held_out_share != held_out_share - 1]
    if steps <= 0 or not held or not fit:
        return Refinement(0, math.nan, math.nan)
    trained = _trainable(layer)
    error_before = best = _error(layer, inputs, targets, kwargs, held, batch)
    if not error_before > EXACT:
        return Refinement(0, error_before, error_before)
    best_step, best_state, since_best = 0, [p.detach().clone() for p in trained], 0
    optimizer = torch.optim.Adam(trained, lr=LEARNING_RATE)
    order = torch.randperm(len(fit), generator=torch.Generator().manual_seed(0))
    for step in range(1, steps + 1):
        picked = [fit[int(i)] for i in order.roll(-((step - 1) * batch) % len(fit))[:batch]]
        with torch.enable_grad():
            loss = _squared_error(layer, inputs, targets, kwargs, batch, picked)[0]
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
        optimizer.step()
        if step % CHECK_EVERY and step != steps:
            continue
        error = _error(layer, inputs, targets, kwargs, held, batch)
        if error < best:
            best, best_step, best_state, since_best = error, step, [p.detach().clone() for p in trained], 0
        else:
            since_best += 1
            if since_best >= PATIENCE:
                break
    with torch.no_grad():
        for param, kept in zip(trained, best_state):
            param.copy_(kept)
    for param in layer.parameters():
        param.requires_grad_(False)
    return Refinement(best_step, error_before, best)


def _trainable(layer: nn.Module) -> list[nn.Parameter]:
    """The attention projections' weights and biases get gradients; everything else in the layer is frozen."""
    trained, where = [], attention_name(layer)
    for name, param in layer.named_parameters():
        parts = name.split(".")
        chosen = parts[0] == where and len(parts) > 1 and parts[1] in PROJECTIONS
        param.requires_grad_(chosen)
        if chosen:
            trained.append(param)
    return trained


def _prediction(layer: nn.Module, hidden: torch.Tensor, kwargs: dict) -> torch.Tensor:
    """The layer's output, or its attention block's output before o_proj's bias (a hook stops the layer there)."""
    if OBJECTIVE == "layer":
        return layer_output(layer(hidden, **kwargs))
    attention = attention_of(layer)
    seen = {}

    def catch(module, args, kw, output):
        seen["output"] = output[0] if isinstance(output, tuple) else output
        raise _Stop

    handle = attention.register_forward_hook(catch, with_kwargs=True)
    try:
        layer(hidden, **kwargs)
    except _Stop:
        pass
    finally:
        handle.remove()
    bias = output_projection(attention).bias
    return seen["output"] - bias if bias is not None else seen["output"]


def _squared_error(layer: nn.Module, inputs: torch.Tensor, targets: torch.Tensor, kwargs: dict, batch: int,
                   sequences: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """sum |prediction - target|^2 / sum |target - input|^2 over `sequences` (the target itself for the attention
    objective), and that denominator: relative to what the layer must change, not to the residual stream."""
    x, y = inputs[sequences], targets[sequences]
    change = y - x if OBJECTIVE == "layer" else y
    scale = (change * change).sum()
    return ((_prediction(layer, x, _for(kwargs, batch, len(sequences))) - y) ** 2).sum() / scale, scale


def _for(kwargs: dict, batch: int, sequences: int) -> dict:
    """The layer's keyword arguments (caught for a batch of `batch` sequences) for a slice of `sequences`: tensors
    of two or more dimensions whose first is that batch (masks, some architectures' rotary tables) are cut to it;
    those of batch 1 broadcast as they are."""
    def cut(value):
        if isinstance(value, tuple):
            return tuple(cut(v) for v in value)
        if isinstance(value, torch.Tensor) and value.dim() >= 2 and value.shape[0] == batch > 1:
            return value[:sequences]
        return value

    return {name: cut(value) for name, value in kwargs.items()}


@torch.no_grad()
def _error(layer: nn.Module, inputs: torch.Tensor, targets: torch.Tensor, kwargs: dict, sequences: list[int],
           batch: int) -> float:
    """Relative error over `sequences`, in batches (sqrt of summed squares over summed scales)."""
    missed = total = 0.0
    for start in range(0, len(sequences), batch):
        ratio, scale = _squared_error(layer, inputs, targets, kwargs, batch, sequences[start:start + batch])
        missed += float(ratio * scale)
        total += float(scale)
    return math.sqrt(missed / total) if total else math.nan
