"""Two CPU processes under DDP (gloo) train the same model as one process with the same global batch."""

import os
import subprocess
import sys

import torch
from safetensors.torch import load_file

from .conftest import TINY_RECIPE, overrides, run_cli

RUN = ["budget.steps=6", "checkpoint.every=3", "eval.every=3", "log.every=2"]


def test_two_process_ddp_matches_one_process(tmp_path, tiny_llama_gqa2, shakespeare):
    args = [str(TINY_RECIPE), *overrides(tiny_llama_gqa2, shakespeare, tmp_path / "ddp", *RUN)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    ddp = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         "-m", "gqa_uptrain.train", *args],
        capture_output=True, text=True, env=env,
    )
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    assert "on 2 process(es)" in ddp.stdout and "gradient accumulation 1" in ddp.stdout

    single = run_cli(str(TINY_RECIPE), *overrides(tiny_llama_gqa2, shakespeare, tmp_path / "single", *RUN))
    assert single.returncode == 0, single.stderr[-3000:]
    assert "gradient accumulation 2" in single.stdout

    # Same sequences per step (the seedable sampler hands rank r every other micro-batch), same mean loss:
    # the weights agree up to the order of floating-point sums.
    two = load_file(tmp_path / "ddp" / "model" / "model.safetensors")
    one = load_file(tmp_path / "single" / "model" / "model.safetensors")
    for name in one:
        torch.testing.assert_close(two[name], one[name], rtol=0, atol=1e-4, msg=name)
    start = load_file(tiny_llama_gqa2 / "model.safetensors")
    key = "model.layers.0.self_attn.k_proj.weight"
    assert not torch.equal(two[key], start[key])
    assert '"world_size": 2' in (tmp_path / "ddp" / "model" / "gqa_provenance.json").read_text()
