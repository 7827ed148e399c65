"""What the run reports: throughput and MFU, trackers through accelerate, a JSONL history and a loss-curve PNG.

MFU = FLOPs per token (budget.flops_per_token) x tokens per second / (peak FLOP/s per device x devices),
nanoGPT/PaLM style. The peak is `log.peak_tflops` from the recipe, or the dense bf16 figure of a known GPU.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator

from gqa_uptrain.dicts import flatten
from gqa_uptrain.errors import ConfigError

# Dense bf16 tensor-core peaks from the vendors' data sheets (TFLOP/s, SXM parts).
_PEAK_TFLOPS = {"H200": 989.4, "H100": 989.4, "A100": 312.0, "B200": 2250.0, "L40S": 362.1, "A10G": 70.0}


def peak_tflops(configured: float | None) -> float | None:
    if configured is not None or not torch.cuda.is_available():
        return configured
    name = torch.cuda.get_device_name()
    return next((value for key, value in _PEAK_TFLOPS.items() if key in name), None)


class Throughput:
    """Tokens per second and MFU over the window since the last report (time spent saving or evaluating excluded)."""

    def __init__(self, flops_per_token: float, peak_tflops: float | None, world_size: int) -> None:
        self.flops_per_token, self.peak, self.world_size = flops_per_token, peak_tflops, world_size
        self.restart()

    def restart(self) -> None:
        self.tokens, self.started = 0, time.perf_counter()

    def add(self, tokens: int) -> None:
        self.tokens += tokens

    def report(self) -> dict[str, float]:
        """Figures for the window, then start a new one."""
        elapsed = max(time.perf_counter() - self.started, 1e-9)
        rate = self.tokens / elapsed
        figures = {"tokens_per_s": rate}
        if self.peak is not None:
            figures["mfu"] = rate * self.flops_per_token / (self.peak * 1e12 * self.world_size)
        self.restart()
        return figures


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


def check_trackers(trackers: list[str]) -> None:
    """Fail before any work when a requested tracker's package is missing."""
    from accelerate.utils import is_tensorboard_available, is_wandb_available

    available = {"tensorboard": is_tensorboard_available, "wandb": is_wandb_available}
    for name in trackers:
        if not available[name]():
            raise ConfigError(f"log.trackers asks for {name}, which is not installed (pip install {name})")


def flat_config(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Dotted scalar hyper-parameters, as TensorBoard's hparams accept them."""
    return {name: value if isinstance(value, (int, float, str, bool)) else str(value)
            for name, value in flatten(tree, prefix).items()}


class History:
    """metrics.jsonl in the output folder: every logged record, kept consistent with the resumed step."""

    def __init__(self, path: Path, accelerator: Accelerator) -> None:
        self.path, self.accelerator = path, accelerator

    def truncate(self, step: int) -> None:
        """Forget records past `step` (written by a run that died after its last checkpoint)."""
        if self.accelerator.is_main_process and self.path.exists():
            kept = [line for line in self.path.read_text().splitlines() if json.loads(line)["step"] <= step]
            self.path.write_text("".join(line + "\n" for line in kept))

    def log(self, record: dict[str, Any], step: int) -> None:
        self.accelerator.log(record, step=step)
        if self.accelerator.is_main_process:
            with self.path.open("a") as file:
                file.write(json.dumps({"step": step, **record}) + "\n")

    def records(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.path.read_text().splitlines()] if self.path.exists() else []


def plot_loss_curve(records: list[dict[str, Any]], path: Path) -> None:
    """Training and validation loss against tokens seen, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7, 4), dpi=120)
    for key, label in (("loss", "train"), ("val_loss", "validation")):
        points = [(r["tokens"], r[key]) for r in records if key in r]
        if points:
            axes.plot(*zip(*points), marker="o" if key == "val_loss" else None, label=label)
    axes.set_xlabel("tokens")
    axes.set_ylabel("loss (nats per token)")
    axes.set_title("gqa-uptrain loss curve")
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)
