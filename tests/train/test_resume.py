"""Kill the process mid-run, run the same command again: the final weights equal an uninterrupted run's."""

import os
import shutil
import signal
import subprocess
import sys

import pytest
import torch
from processes import wait_for
from safetensors.torch import load_file

from gqa_uptrain.train.checkpoint import damage

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
    wait_for((killed / "checkpoints" / "step-00000005").exists, 120, "no first checkpoint", process)
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


def _tear(checkpoint, how: str) -> None:
    """Damage a checkpoint's weights as a crash after an unsynced rename leaves them."""
    weights = checkpoint / "model.safetensors"
    weights.write_bytes(b"" if how == "empty" else weights.read_bytes()[: weights.stat().st_size // 2])


@pytest.mark.parametrize("torn, how, resumed_from", [
    (["step-00000015"], "truncated", "step-00000010"),
    (["step-00000005", "step-00000010", "step-00000015"], "empty", None),
])
@pytest.mark.slow
def test_a_torn_newest_checkpoint_is_passed_over_with_one_warning(tmp_path, tiny_llama_gqa2, shakespeare, capsys,
                                                                  fresh_accelerate, torn, how, resumed_from):
    """A run killed just before its export, whose newest checkpoints are torn: the same command resumes from the
    newest whole one (or starts over when none is whole), says so in one warning line, and ends with the weights
    of an uninterrupted run."""
    from gqa_uptrain.train.cli import main
    from gqa_uptrain.train.loop import reset_accelerate_state

    output = tmp_path / "run"
    argv = [str(TINY_RECIPE), *overrides(tiny_llama_gqa2, shakespeare, output, "budget.steps=15",
                                         "checkpoint.every=5", "checkpoint.keep=3", "eval.every=5", "log.every=5")]
    main(argv)
    expected = load_file(output / "model" / "model.safetensors")
    shutil.rmtree(output / "model")
    for name in torn:
        _tear(output / "checkpoints" / name, how)
    reset_accelerate_state()
    capsys.readouterr()

    main(argv)
    said = capsys.readouterr()
    warnings = [line for line in said.err.splitlines() if line.startswith("gqa-uptrain: ")]
    assert len(warnings) == 1 and warnings[0].startswith("gqa-uptrain: warning: "), warnings
    assert all(name in warnings[0] for name in torn)
    assert "model.safetensors is " + ("empty" if how == "empty" else "torn (Error while deserializing") in warnings[0]
    assert warnings[0].endswith(f"resuming from {resumed_from}" if resumed_from else "starting over from step 0")
    assert ("resumed from" in said.out) == bool(resumed_from) and "Traceback" not in said.err
    actual = load_file(output / "model" / "model.safetensors")
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], rtol=0, atol=1e-6, msg=name)
    kept = sorted((output / "checkpoints").iterdir())
    assert [p.name for p in kept] == ["step-00000005", "step-00000010", "step-00000015"]
    assert [damage(p) for p in kept] == [None] * 3  # the torn ones were written again as the run passed them


@pytest.mark.slow
def test_resume_after_the_training_file_changed_is_refused(tmp_path, tiny_llama_gqa2, shakespeare, capsys,
                                                           fresh_accelerate):
    """A run killed before its export; then its training file is rewritten under the same path (the recipe is the
    same): its checkpoint counts batches of the old text, so the run refuses to resume and keeps its checkpoints.
    Touched but unchanged (a copy back), it resumes."""
    from gqa_uptrain.train.cli import main
    from gqa_uptrain.train.loop import reset_accelerate_state

    text, output = shutil.copy(shakespeare, tmp_path / "books.txt"), tmp_path / "run"
    argv = [str(TINY_RECIPE), *overrides(tiny_llama_gqa2, text, output, "budget.steps=10", "checkpoint.every=5",
                                         "eval.every=5", "log.every=5")]
    main(argv)
    shutil.rmtree(output / "model")
    (tmp_path / "books.txt").write_text(shakespeare.read_text().replace("the", "thy"))
    reset_accelerate_state()
    capsys.readouterr()

    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    said = [line for line in capsys.readouterr().err.splitlines() if line.startswith("gqa-uptrain: ")]
    assert len(said) == 1 and said[0].startswith("gqa-uptrain: error: "), said
    assert f"started on other data than its data paths hold now ({text} changed since)" in said[0]
    assert sorted(p.name for p in (output / "checkpoints").iterdir()) == ["step-00000005", "step-00000010"]
    assert not (output / "model").exists()

    shutil.copy(shakespeare, text)  # the same text again, written anew
    reset_accelerate_state()
    main(argv)
    assert "resumed from" in capsys.readouterr().out and (output / "model" / "model.safetensors").is_file()
