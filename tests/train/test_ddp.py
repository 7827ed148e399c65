"""Two CPU processes under DDP (gloo) train the same model as one process with the same global batch."""

import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from .conftest import PROJECTIONS, TINY_RECIPE, changed_tensors, overrides, run_cli

pytestmark = pytest.mark.slow  # launches two training processes

RUN = ["budget.steps=6", "checkpoint.every=3", "eval.every=3", "log.every=2"]


@pytest.fixture(params=["all", "attention-shared-teacher"])
def trained(request, tiny_llama, tiny_llama_gqa2, converted_tiny_llama) -> tuple:
    """(model, extra overrides): full training, or attention-only with a teacher that shares the frozen body."""
    if request.param == "all":
        return tiny_llama_gqa2, []
    return converted_tiny_llama, ["train.trainable=attention", f"teacher.path={tiny_llama}"]


def test_two_process_ddp_matches_one_process(tmp_path, trained, shakespeare):
    model, extra = trained
    args = [str(TINY_RECIPE), *overrides(model, shakespeare, tmp_path / "ddp", *RUN, *extra)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    ddp = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         "-m", "gqa_uptrain.train", *args],
        capture_output=True, text=True, env=env,
    )
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    assert "on 2 process(es)" in ddp.stdout and "gradient accumulation 1" in ddp.stdout
    assert ("shares the student's frozen body" in ddp.stdout) == bool(extra)

    single = run_cli(str(TINY_RECIPE), *overrides(model, shakespeare, tmp_path / "single", *RUN, *extra))
    assert single.returncode == 0, single.stderr[-3000:]
    assert "gradient accumulation 2" in single.stdout

    # Same sequences per step (the seedable sampler hands rank r every other micro-batch), same mean loss:
    # the weights agree up to the order of floating-point sums.
    two = load_file(tmp_path / "ddp" / "model" / "model.safetensors")
    one = load_file(tmp_path / "single" / "model" / "model.safetensors")
    for name in one:
        torch.testing.assert_close(two[name], one[name], rtol=0, atol=1e-4, msg=name)
    start = load_file(model / "model.safetensors")
    key = "model.layers.0.self_attn.k_proj.weight"
    assert not torch.equal(two[key], start[key])
    if extra:  # under DDP too, only the attention projections moved
        assert all(name.split(".")[-2] in PROJECTIONS for name in changed_tensors(model, tmp_path / "ddp" / "model"))
    assert '"world_size": 2' in (tmp_path / "ddp" / "model" / "gqa_provenance.json").read_text()
