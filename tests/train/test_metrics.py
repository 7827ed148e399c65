"""One MFU: the datasheet dense bf16 peak unless the recipe names another, and the log says which."""

import io
import time

import pytest
import torch

from gqa_uptrain.train.loss_curve import loss_figure
from gqa_uptrain.train.progress import Progress
from gqa_uptrain.train.recovery import Gap
from gqa_uptrain.train.throughput import Peak, Throughput, mfu, peak_tflops


def test_mfu_is_model_flops_over_the_peak_of_every_device():
    # The figure docs/benchmarks.md gives for the compiled TinyLlama-shaped run on one H100.
    assert mfu(64_456, 7.314e9, 989.4, 1) == pytest.approx(0.4765, abs=1e-4)
    assert mfu(2 * 64_456, 7.314e9, 989.4, 2) == pytest.approx(0.4765, abs=1e-4)


def test_the_peak_is_the_datasheet_one_and_says_so(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *args: "NVIDIA H200")
    peak = peak_tflops(None)
    assert (peak.tflops, peak.label) == (989.4, "mfu(datasheet H200 989 TF)")
    assert "datasheet H200 dense bf16 peak, 989.4 TFLOP/s per device" in peak.description
    configured = peak_tflops(500.0)
    assert configured.label == "mfu(log.peak_tflops 500 TF)"
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *args: "Some Other GPU")
    assert peak_tflops(None) is None  # unknown: no MFU rather than a wrong one


def test_throughput_reports_mfu_with_its_denominator():
    throughput = Throughput(1e9, Peak(100.0, "log.peak_tflops"), world_size=2)
    throughput.add(1000)
    time.sleep(0.01)
    figures = throughput.report()
    assert figures["mfu_peak_tflops"] == 100.0
    expected = mfu(figures["tokens_per_s"], 1e9, 100.0, 2)
    assert figures["mfu"] == pytest.approx(expected)
    assert "mfu" not in Throughput(1e9, None, 1).report()


def test_smoothed_throughput_is_the_rate_over_the_recent_windows(monkeypatch):
    clock = iter([0.0, 1.0, 1.0, 1.1, 1.1])  # windows of 1 s and 0.1 s for 1,000 tokens each
    monkeypatch.setattr(time, "perf_counter", lambda: next(clock))
    throughput = Throughput(1e9, None, 1)
    throughput.add(1000)
    assert throughput.report() == pytest.approx({"tokens_per_s": 1000.0, "tokens_per_s_smoothed": 1000.0})
    throughput.add(1000)
    assert throughput.report() == pytest.approx({"tokens_per_s": 10_000.0, "tokens_per_s_smoothed": 2000 / 1.1})


def logged(**extra) -> dict:
    return {"loss": 2.34567, "lr": 3e-4, "tokens": 4096, "tokens_per_s": 1500.0, "tokens_per_s_smoothed": 1234.4,
            **extra}


def test_a_log_file_gets_plain_lines_not_a_progress_bar():
    out = io.StringIO()
    with Progress(100, 0, enabled=True, peak=Peak(989.4, "datasheet H100"), out=out,
                          terminal=False) as progress:
        assert progress.bar is None
        progress.validated(0, 3.0)
        for step in range(1, 21):
            progress.update()
            if step % 10 == 0:
                progress.log(step, logged(mfu=0.4, kd_loss=0.5))
        progress.validated(20, 2.0)
    lines = out.getvalue().splitlines()
    assert "\r" not in out.getvalue() and len(lines) == 4  # one line per validation and per logged step
    assert lines[0] == "step   0/100  val_loss 3.0000  val_ppl 20.09"
    assert lines[1].startswith("step  10/100  loss 2.3457  kd_loss 0.5000  tok/s 1,234  "
                               "mfu(datasheet H100 989 TF) 40.0%  lr 3.00e-04  elapsed 0:00:00  eta 0:00:00")
    assert lines[2].startswith("step  20/100  loss 2.3457")
    assert lines[3] == "step  20/100  val_loss 2.0000  val_ppl 7.39"


def test_a_terminal_gets_the_bar_and_the_validation_lines(capsys):
    out = io.StringIO()
    with Progress(10, 0, enabled=True, out=out, terminal=True) as progress:
        assert progress.bar is not None
        progress.update()
        progress.log(1, logged())
        assert progress.bar.postfix == "loss=2.3457, tok/s=1,234"
        progress.validated(1, 2.0)
    assert out.getvalue() == "step  1/10  val_loss 2.0000  val_ppl 7.39\n"


def test_other_processes_print_nothing(capsys):
    out = io.StringIO()
    for terminal in (True, False):
        with Progress(10, 0, enabled=False, out=out, terminal=terminal) as progress:
            progress.update()
            progress.log(1, logged())
            progress.validated(1, 2.0)
    assert out.getvalue() == "" and capsys.readouterr() == ("", "")


def test_the_share_of_the_gap_recovered_is_measured_from_the_start_towards_the_teacher():
    """gap = start - teacher (validation losses on the same batches); recovered = (start - now) / gap."""
    gap = Gap(start=5.0, reference=3.0)
    assert [gap.recovered(loss) for loss in (5.0, 4.5, 3.0, 2.5, 5.5)] == [0.0, 0.25, 1.0, 1.25, -0.25]
    assert Gap(start=3.0, reference=3.0).recovered(2.9) is None  # the conversion cost nothing measurable
    records = [{"step": 0, "tokens": 0, "val_loss": 5.0, "reference_val_loss": 3.0}, {"step": 5, "val_loss": 4.0}]
    assert Gap.of(records) == gap and Gap.of(records[1:]) is None  # no teacher, no reference
    out = io.StringIO()
    with Progress(10, 0, enabled=True, out=out, terminal=False) as progress:
        progress.validated(5, 4.5, gap)
    assert out.getvalue() == ("step  5/10  val_loss 4.5000  val_ppl 90.02  recovered 25.0% of the gap to the "
                              "teacher's 3.0000 (start 5.0000)\n")


def test_the_loss_curve_shows_the_teacher_as_the_reference():
    records = [{"step": 0, "tokens": 0, "val_loss": 5.0, "reference_val_loss": 3.0},
               {"step": 5, "tokens": 100, "loss": 4.2}, {"step": 5, "tokens": 100, "val_loss": 4.0}]
    axes = loss_figure(records).axes[0]
    labels = axes.get_legend_handles_labels()[1]
    assert labels == ["train", "validation", "teacher, validation: 50% of the gap recovered"]
    reference = axes.get_lines()[-1]
    assert list(reference.get_ydata()) == [3.0, 3.0]
    assert loss_figure(records[1:]).axes[0].get_legend_handles_labels()[1] == ["train", "validation"]
