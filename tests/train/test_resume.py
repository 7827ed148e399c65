"""Kill the process mid-run, run the same command again: the final weights equal an uninterrupted run's."""

import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from .conftest import TINY_RECIPE, overrides, run_cli

RUN = ["budget.steps=20", "batch.global_batch=2", "checkpoint.every=5", "eval.every=10", "log.every=5"]


@pytest.fixture(params=["all", "attention-shared-teacher"])
def trained(request, tiny_llama, tiny_llama_gqa2, converted_tiny_llama) -> tuple:
    """(model, extra overrides): full training, or attention-only with a teacher that shares the frozen body."""
    if request.param == "all":
        return tiny_llama_gqa2, []
    return converted_tiny_llama, ["train.trainable=attention", f"teacher.path={tiny_llama}"]


@pytest.mark.slow
def test_sigkill_then_rerun_matches_an_uninterrupted_run(tmp_path, trained, shakespeare):
    model, extra = trained
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    done = run_cli(str(TINY_RECIPE), *overrides(model, shakespeare, straight, *RUN, *extra))
    assert done.returncode == 0, done.stderr[-2000:]
    assert ("shares the student's frozen body" in done.stdout) == bool(extra)

    args = [str(TINY_RECIPE), *overrides(model, shakespeare, killed, *RUN, *extra)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen([sys.executable, "-m", "gqa_uptrain.train", *args], env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not (killed / "checkpoints" / "step-00000005").exists():
        assert process.poll() is None and time.monotonic() < deadline, "the run ended before its first checkpoint"
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (killed / "model").exists(), "the kill came too late to interrupt the run"

    resumed = run_cli(*args)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resumed from" in resumed.stdout + resumed.stderr

    expected = load_file(straight / "model" / "model.safetensors")
    actual = load_file(killed / "model" / "model.safetensors")
    assert expected.keys() == actual.keys()
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], rtol=0, atol=1e-6, msg=name)
    steps = [line for line in (killed / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]
    assert len(steps) == 4  # records of the killed run past its checkpoint were dropped, not duplicated
    first = [line for line in (killed / "metrics.jsonl").read_text().splitlines() if '"step": 0,' in line]
    assert len(first) == 1 and '"val_loss"' in first[0]  # the converted model's validation, not repeated on resume
