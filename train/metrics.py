"""What the run reports: throughput and MFU, the console (`Progress`), trackers through accelerate, a JSONL history
and a loss-curve PNG.

MFU (`mfu`, the one definition in this project) = FLOPs per token (budget.flops_per_token) x tokens per second /
(peak FLOP/s per device x devices), nanoGPT/PaLM style, where the peak is the vendor's DATASHEET dense bf16 figure
(989.4 TFLOP/s for H100 and H200 SXM), the common convention; `log.peak_tflops` in the recipe replaces it, and the
log names whichever was used (`mfu(datasheet H200 989 TF)`). A measured matmul peak (about 790 TFLOP/s on those
GPUs) gives a figure 1.25x higher for the same run: docs/benchmarks.md says which peak each figure uses.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections import deque
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, TextIO

import torch
from accelerate import Accelerator
from tqdm.auto import tqdm

from gqa_uptrain.atomic_write import write_atomically
from gqa_uptrain.cli import warn
from gqa_uptrain.dicts import flatten
from gqa_uptrain.errors import ConfigError, DivergedError
from gqa_uptrain.plotting import pyplot

# Dense bf16 tensor-core peaks from the vendors' data sheets (TFLOP/s, SXM parts).
_DATASHEET_PEAK_TFLOPS = {
    "H200": 989.4, "H100": 989.4, "A100": 312.0, "B200": 2250.0, "L40S": 362.1, "A10G": 70.0,
}


@dataclass(frozen=True)
class Peak:
    """The per-device peak MFU is measured against, and where it comes from."""

    tflops: float
    source: str  # "datasheet H200" or "log.peak_tflops"

    @property
    def description(self) -> str:
        if self.source == "log.peak_tflops":
            return f"log.peak_tflops, {self.tflops:g} TFLOP/s per device"
        return f"the {self.source} dense bf16 peak, {self.tflops:g} TFLOP/s per device"

    @property
    def label(self) -> str:
        """How the log names the MFU: `mfu(datasheet H200 989 TF)`."""
        return f"mfu({self.source} {self.tflops:.0f} TF)"


def peak_tflops(configured: float | None) -> Peak | None:
    """The recipe's `log.peak_tflops`, else the datasheet dense bf16 peak of a known GPU, else None (no MFU)."""
    if configured is not None:
        return Peak(configured, "log.peak_tflops")
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    return next((Peak(value, f"datasheet {key}") for key, value in _DATASHEET_PEAK_TFLOPS.items() if key in name),
                None)


def mfu(tokens_per_s: float, flops_per_token: float, peak_tflops: float, devices: int) -> float:
    """Model FLOPs utilisation: the model's FLOPs per second over the peak of every device together."""
    return tokens_per_s * flops_per_token / (peak_tflops * 1e12 * devices)


def peak_memory(device: torch.device) -> dict[str, float]:
    """The most GPU memory this process has held so far, in GiB (allocated by tensors, and reserved by PyTorch's
    caching allocator: what the GPU must have free); nothing on a CPU."""
    if device.type != "cuda":
        return {}
    return {"max_memory_allocated_gib": torch.cuda.max_memory_allocated(device) / 2**30,
            "max_memory_reserved_gib": torch.cuda.max_memory_reserved(device) / 2**30}


class Throughput:
    """Tokens per second and MFU over the window since the last report (time spent saving or evaluating excluded),
    and `tokens_per_s_smoothed`: the rate over the last `SMOOTHED_WINDOWS` windows together, which one slow window
    (a data-loader stall, the first step's warm-up) moves only a little."""

    SMOOTHED_WINDOWS = 10

    def __init__(self, flops_per_token: float, peak: Peak | None, world_size: int) -> None:
        self.flops_per_token, self.peak, self.world_size = flops_per_token, peak, world_size
        self.recent: deque[tuple[int, float]] = deque(maxlen=self.SMOOTHED_WINDOWS)  # (tokens, seconds) per window
        self.restart()

    def restart(self) -> None:
        self.tokens, self.started = 0, time.perf_counter()

    def add(self, tokens: int) -> None:
        self.tokens += tokens

    def report(self) -> dict[str, float]:
        """Figures for the window, then start a new one."""
        elapsed = max(time.perf_counter() - self.started, 1e-9)
        rate = self.tokens / elapsed
        self.recent.append((self.tokens, elapsed))
        smoothed = sum(tokens for tokens, _ in self.recent) / sum(seconds for _, seconds in self.recent)
        figures = {"tokens_per_s": rate, "tokens_per_s_smoothed": smoothed}
        if self.peak is not None:
            figures["mfu"] = mfu(rate, self.flops_per_token, self.peak.tflops, self.world_size)
            figures["mfu_peak_tflops"] = self.peak.tflops
        self.restart()
        return figures


class Progress:
    """The training console of the main process (the others print nothing). On a terminal, tqdm's bar, with the
    latest loss and smoothed tokens/s beside it. Elsewhere (stdout or stderr is a log file, as on a GPU machine) the
    bar's carriage returns would turn every refresh into a line of its own: there, one plain line per logged step
    instead (step, loss, smoothed tokens/s, MFU, elapsed time and ETA). Both print the validation loss when it is
    measured."""

    def __init__(self, total: int, initial: int, enabled: bool, peak: Peak | None = None,
                 out: TextIO | None = None, terminal: bool | None = None) -> None:
        self.out = out or sys.stdout
        if terminal is None:
            terminal = sys.stdout.isatty() and sys.stderr.isatty()
        self.total, self.enabled, self.peak = total, enabled, peak
        self.first, self.started = initial, time.perf_counter()
        self.bar = None
        if enabled and terminal:
            self.bar = tqdm(total=total, initial=initial, desc="uptraining", unit="step")

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()  # on an error too, so that its message starts a line

    def update(self) -> None:
        if self.bar is not None:
            self.bar.update()

    def log(self, step: int, record: dict[str, Any]) -> None:
        """A logged step: its record as History writes it (loss, tokens_per_s_smoothed, optionally kd_loss, mfu)."""
        figures = {"loss": f"{record['loss']:.4f}"}
        if "kd_loss" in record:
            figures["kd_loss"] = f"{record['kd_loss']:.4f}"
        figures["tok/s"] = f"{record['tokens_per_s_smoothed']:,.0f}"
        if "mfu" in record and self.peak is not None:
            figures[self.peak.label] = f"{record['mfu']:.1%}"
        if self.bar is not None:
            self.bar.set_postfix(figures)
        elif self.enabled:
            elapsed = time.perf_counter() - self.started
            eta = elapsed / max(step - self.first, 1) * (self.total - step)
            self._line(step, {**figures, "lr": f"{record['lr']:.2e}",
                              "elapsed": _clock(elapsed), "eta": _clock(eta)})

    def validated(self, step: int, val_loss: float, gap: Gap | None = None) -> None:
        figures = {"val_loss": f"{val_loss:.4f}", "val_ppl": f"{torch.tensor(val_loss).exp().item():,.2f}"}
        if gap is not None:
            figures["recovered"] = gap.describe(val_loss)
        self._line(step, figures)

    def _line(self, step: int, figures: dict[str, str]) -> None:
        if not self.enabled:
            return
        width = len(f"{self.total:,}")
        line = f"step {step:>{width},}/{self.total:,}  " + "  ".join(f"{k} {v}" for k, v in figures.items())
        if self.bar is not None:
            self.bar.write(line, file=self.out)
        else:
            print(line, file=self.out, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


@dataclass(frozen=True)
class Gap:
    """What the conversion cost, and how much of it training has won back, in validation loss on the same batches.

    gap = start - reference, where start is the converted model's loss before any step and reference the teacher's
    (the original model, as recipes use it), measured once at step 0; recovered = (start - now) / gap. 100% means
    the teacher's loss is reached; above 100%, passed (the student also learns the data). Undefined (None) where
    the conversion cost nothing measurable (gap <= 0).
    """

    start: float
    reference: float

    @classmethod
    def of(cls, records: list[dict[str, Any]]) -> Gap | None:
        """From the step-0 record of metrics.jsonl; None when it holds no reference (a run without a teacher)."""
        first = next((r for r in records if r["step"] == 0 and "reference_val_loss" in r), None)
        return cls(first["val_loss"], first["reference_val_loss"]) if first else None

    def recovered(self, val_loss: float) -> float | None:
        gap = self.start - self.reference
        return (self.start - val_loss) / gap if gap > 0 else None

    def describe(self, val_loss: float) -> str:
        share = self.recovered(val_loss)
        if share is None:
            return f"nothing, there is no gap: the start {self.start:.4f} is not above the teacher's {self.reference:.4f}"
        return f"{share:.1%} of the gap to the teacher's {self.reference:.4f} (start {self.start:.4f})"


def _clock(seconds: float) -> str:
    return str(timedelta(seconds=round(seconds)))


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
    """metrics.jsonl in the output folder: every logged record, kept consistent with the resumed step.

    Append-safe: each record is one whole line written by one write (a failed write is undone), and a resume
    drops a torn or unreadable line (a crash or a full disk mid-write) with one warning instead of failing.
    """

    def __init__(self, path: Path, accelerator: Accelerator) -> None:
        self.path, self.accelerator = path, accelerator

    def truncate(self, step: int) -> None:
        """Forget records past `step` (written by a run that died after its last checkpoint) and unreadable lines."""
        if not self.accelerator.is_main_process or not self.path.exists():
            return
        records, unreadable = read_records(self.path)
        kept = [record for record in records if record["step"] <= step]
        if unreadable:
            warn("gqa-uptrain", f"{self.path}: dropped {unreadable} torn or unreadable line(s), left by a crash "
                 "or a full disk while it was written")
        whole = self.path.read_bytes().endswith(b"\n") or self.path.stat().st_size == 0
        if unreadable or len(kept) != len(records) or not whole:
            write_atomically(self.path, "".join(json.dumps(record) + "\n" for record in kept))

    def log(self, record: dict[str, Any], step: int) -> None:
        self.accelerator.log(record, step=step)
        if self.accelerator.is_main_process:
            append_line(self.path, json.dumps({"step": step, **record}))

    def records(self) -> list[dict[str, Any]]:
        return read_records(self.path)[0] if self.path.exists() else []


def append_line(path: Path, line: str) -> None:
    """Append `line` and a newline as one write; if it fails (a full disk), cut the file back to where it was."""
    data = (line + "\n").encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        start = os.fstat(fd).st_size
        try:
            written = 0
            while written < len(data):
                written += os.write(fd, data[written:])
        except OSError:
            os.ftruncate(fd, start)
            raise
    finally:
        os.close(fd)


def read_records(path: Path) -> tuple[list[dict[str, Any]], int]:
    """(the JSON records with a step, number of lines that are not one: torn, unparsable or without a step)."""
    records, unreadable = [], 0
    for line in path.read_bytes().split(b"\n"):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:  # a torn line, or bytes that are not UTF-8
            unreadable += 1
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), int):
            records.append(record)
        else:
            unreadable += 1
    return records, unreadable


def plot_loss_curve(records: list[dict[str, Any]], path: Path) -> None:
    """Training and validation loss against tokens seen, as a PNG (`loss_figure`)."""
    figure = loss_figure(records)
    figure.savefig(path)
    pyplot().close(figure)


def loss_figure(records: list[dict[str, Any]]):
    """The loss curves, with the teacher's validation loss (the original model's, measured at step 0) as the level
    the conversion's gap closes towards."""
    plt = pyplot()
    figure, axes = plt.subplots(figsize=(7, 4), dpi=120)
    for key, label in (("loss", "train"), ("val_loss", "validation")):
        points = [(r["tokens"], r[key]) for r in records if key in r]
        if points:
            axes.plot(*zip(*points), marker="o" if key == "val_loss" else None, label=label)
    gap = Gap.of(records)
    if gap is not None:
        share = gap.recovered(next(r["val_loss"] for r in reversed(records) if "val_loss" in r))
        recovered = f": {share:.0%} of the gap recovered" if share is not None else ""
        axes.axhline(gap.reference, color="black", linestyle="--", linewidth=1, label=f"teacher, validation{recovered}")
    axes.set_xlabel("tokens")
    axes.set_ylabel("loss (nats per token)")
    axes.set_title("gqa-uptrain loss curve")
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    return figure
