"""Throughput and MFU: tokens per second over each logging window, against a named peak; and peak GPU memory.

MFU (`mfu`, the one definition in this project) = FLOPs per token (budget.flops_per_token) x tokens per second /
(peak FLOP/s per device x devices), nanoGPT/PaLM style, where the peak is the vendor's DATASHEET dense bf16 figure
(989.4 TFLOP/s for H100 and H200 SXM), the common convention; `log.peak_tflops` in the recipe replaces it, and the
log names whichever was used (`mfu(datasheet H200 989 TF)`). A measured matmul peak (about 790 TFLOP/s on those
GPUs) gives a figure 1.25x higher for the same run: docs/benchmarks.md says which peak each figure uses.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass

import torch

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
