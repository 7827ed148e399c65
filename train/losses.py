"""What the optimizer steps' losses are watched for without a host sync per step: their mean over each logging
window (`LossWindow`), and the first step that diverged (`Divergence`)."""

from __future__ import annotations

from pathlib import Path

import torch
from accelerate import Accelerator

from gqa_uptrain.errors import DivergedError


class LossWindow:
    """The LM loss (and distillation loss) summed over the micro-batches since the last report, on the device.

    Adding costs no host sync; `report` averages over every process (a collective: call it on all of them).
    """

    def __init__(self, device: torch.device) -> None:
        self.lm = torch.zeros((), device=device)
        self.kd = torch.zeros((), device=device)
        self.micro_batches, self.distilled = 0, False

    def add(self, lm_loss: torch.Tensor, kd_loss: torch.Tensor | None) -> None:
        self.lm += lm_loss.detach().float()
        if kd_loss is not None:
            self.kd += kd_loss.detach().float()
            self.distilled = True
        self.micro_batches += 1

    def report(self, accelerator: Accelerator) -> tuple[float, float | None]:
        """(mean LM loss, mean distillation loss or None) over the window and every process; then a new window."""
        lm = accelerator.reduce(self.lm, "mean").item() / self.micro_batches
        kd = accelerator.reduce(self.kd, "mean").item() / self.micro_batches if self.distilled else None
        self.lm.zero_()
        self.kd.zero_()
        self.micro_batches = 0
        return lm, kd


class Divergence:
    """The first optimizer step whose loss was NaN or infinite, kept on the device so that watching costs no sync.

    `check` (a collective: call it on every process) raises before a checkpoint, an evaluation or the export would
    be made from a diverged model, naming the step.
    """

    def __init__(self, device: torch.device) -> None:
        self.first = torch.full((1,), -1, dtype=torch.long, device=device)

    def add(self, loss: torch.Tensor, step: int) -> None:
        bad = ~torch.isfinite(loss.detach().float()) & (self.first < 0)
        self.first = torch.where(bad, torch.full_like(self.first, step), self.first)

    def check(self, accelerator: Accelerator, checkpoints: Path) -> None:
        steps = [s for s in accelerator.gather(self.first).tolist() if s >= 0]
        if not steps:
            return
        kept = sorted(p.name for p in checkpoints.glob("step-*")) if checkpoints.is_dir() else []
        last = f"the last good checkpoint, {checkpoints / kept[-1]}, is kept" if kept else "no checkpoint was saved"
        raise DivergedError(
            f"training diverged: the loss was not finite (NaN or inf) at step {min(steps):,}; nothing was exported "
            f"and {last} (lower train.lr or set train.grad_clip, then run again)"
        )
