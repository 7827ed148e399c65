"""One MFU: the datasheet dense bf16 peak unless the recipe names another, and the log says which."""

import time

import pytest
import torch

from gqa_uptrain.train import metrics


def test_mfu_is_model_flops_over_the_peak_of_every_device():
    # The figure docs/benchmarks.md gives for the compiled TinyLlama-shaped run on one H100.
    assert metrics.mfu(64_456, 7.314e9, 989.4, 1) == pytest.approx(0.4765, abs=1e-4)
    assert metrics.mfu(2 * 64_456, 7.314e9, 989.4, 2) == pytest.approx(0.4765, abs=1e-4)


def test_the_peak_is_the_datasheet_one_and_says_so(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *args: "NVIDIA H200")
    peak = metrics.peak_tflops(None)
    assert (peak.tflops, peak.label) == (989.4, "mfu(datasheet H200 989 TF)")
    assert "datasheet H200 dense bf16 peak, 989.4 TFLOP/s per device" in peak.description
    configured = metrics.peak_tflops(500.0)
    assert configured.label == "mfu(log.peak_tflops 500 TF)"
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *args: "Some Other GPU")
    assert metrics.peak_tflops(None) is None  # unknown: no MFU rather than a wrong one


def test_throughput_reports_mfu_with_its_denominator():
    throughput = metrics.Throughput(1e9, metrics.Peak(100.0, "log.peak_tflops"), world_size=2)
    throughput.add(1000)
    time.sleep(0.01)
    figures = throughput.report()
    assert figures["mfu_peak_tflops"] == 100.0
    expected = metrics.mfu(figures["tokens_per_s"], 1e9, 100.0, 2)
    assert figures["mfu"] == pytest.approx(expected)
    assert "mfu" not in metrics.Throughput(1e9, None, 1).report()
