"""A whole 2-process training run under FSDP2 on the CPU (gloo), with and without a distillation teacher.

accelerate 1.15 does not start FSDP on the CPU (see fsdp_cpu_worker.py), so the worker switches each Accelerator to
FSDP2 after building it; the rest is the training loop's and accelerate's FSDP2 path as on GPUs.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from .conftest import PROJECTIONS, TINY_RECIPE, changed_tensors, overrides

pytestmark = pytest.mark.slow  # launches two training processes

HERE = Path(__file__).parent
RUN = ["budget.steps=4", "checkpoint.every=2", "eval.every=2", "log.every=2"]


def fsdp2_on_two_cpu_processes(args: list[str]) -> subprocess.CompletedProcess:
    """gqa-uptrain ARGS under torchrun with 2 CPU processes, switched to FSDP2 by fsdp_cpu_worker.py."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         str(HERE / "fsdp_cpu_worker.py"), *args],
        capture_output=True, text=True, env=env, timeout=300, check=False,
    )


@pytest.mark.parametrize("teacher", [False, True], ids=["student", "distill"])
def test_two_process_fsdp2_run_on_the_cpu(tmp_path, tiny_llama, tiny_llama_gqa2, shakespeare, teacher):
    extra = [f"teacher.path={tiny_llama}"] if teacher else []
    args = [str(TINY_RECIPE), *overrides(tiny_llama_gqa2, shakespeare, tmp_path / "run", *RUN, *extra)]
    result = fsdp2_on_two_cpu_processes(args)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "on 2 process(es)" in result.stdout and "gradient accumulation 1" in result.stdout
    assert ("sharded over 2 process(es) (FSDP)" in result.stdout) == teacher
    run = tmp_path / "run"
    for step in ("step-00000002", "step-00000004"):  # FSDP2's sharded checkpoints: one file per rank
        for part in ("pytorch_model_fsdp_0", "optimizer_0"):
            assert {path.name for path in (run / "checkpoints" / step / part).iterdir()} == {
                "__0_0.distcp", "__1_0.distcp", ".metadata"}, (step, part)
    exported, start = load_file(run / "model" / "model.safetensors"), load_file(tiny_llama_gqa2 / "model.safetensors")
    assert exported.keys() == start.keys()  # gathered whole from the shards
    key = "model.layers.0.self_attn.k_proj.weight"
    assert exported[key].shape == start[key].shape and not torch.equal(exported[key], start[key])
    assert all(torch.isfinite(tensor).all() for tensor in exported.values())


def test_attention_only_under_fsdp2_on_the_cpu(tmp_path, tiny_llama, converted_tiny_llama, shakespeare):
    """Frozen and trainable parameters in one fully_shard unit: only the projections move, bit for bit, and the
    teacher is placed apart (a layer's weights exist only inside its own forward under FSDP2)."""
    extra = ["train.trainable=attention", f"teacher.path={tiny_llama}"]
    args = [str(TINY_RECIPE), *overrides(converted_tiny_llama, shakespeare, tmp_path / "run", *RUN, *extra)]
    result = fsdp2_on_two_cpu_processes(args)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "placed apart from the student" in result.stdout
    changed = changed_tensors(converted_tiny_llama, tmp_path / "run" / "model")
    assert changed and all(name.split(".")[-2] in PROJECTIONS for name in changed)
