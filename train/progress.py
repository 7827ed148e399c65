"""The training console: a tqdm bar on a terminal, one plain line per logged step elsewhere."""

from __future__ import annotations

import sys
import time
from datetime import timedelta
from typing import Any, TextIO

import torch
from tqdm.auto import tqdm

from .recovery import Gap
from .throughput import Peak


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


def _clock(seconds: float) -> str:
    return str(timedelta(seconds=round(seconds)))
