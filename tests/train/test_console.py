"""What a run prints when its output goes to a log file (as on a GPU machine): plain lines, no progress bar."""

import pytest

from .conftest import TINY_RECIPE, overrides, run_cli


@pytest.mark.slow  # a whole run in a subprocess
def test_a_run_logged_to_a_file_prints_one_plain_line_per_log_step(tmp_path, tiny_llama_gqa2, shakespeare):
    result = run_cli(str(TINY_RECIPE), *overrides(tiny_llama_gqa2, shakespeare, tmp_path / "run", "budget.steps=10"),
                     timeout=600)  # stdout and stderr are pipes, not terminals
    assert result.returncode == 0, result.stderr[-3000:]
    assert "uptraining:" not in result.stdout + result.stderr  # no training bar (tqdm's, "uptraining: 50%|...")
    lines = [line for line in result.stdout.splitlines() if line.startswith("step ")]
    # tiny-cpu.yaml: log.every=5, eval.every=10; the converted model is validated before the first step
    assert [line.split()[1] for line in lines] == ["0/10", "5/10", "10/10", "10/10"], result.stdout
    assert "val_loss" in lines[0] and "val_loss" in lines[3]
    for line in lines[1:3]:
        assert " loss " in line and " tok/s " in line and " eta " in line
