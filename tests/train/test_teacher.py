"""The distillation teacher is placed explicitly: replicated, or sharded over the processes like the student."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from accelerate import DistributedType
from safetensors.torch import load_file

from gqa_uptrain.errors import ConfigError
from gqa_uptrain.train.recipe import load_recipe
from gqa_uptrain.train.teacher import choose_placement, deepspeed_teacher_config

from .conftest import TINY_RECIPE, overrides

HERE = Path(__file__).parent
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


@pytest.mark.parametrize(("choice", "launch", "processes", "zero_stage", "expected"), [
    ("auto", DistributedType.NO, 1, None, "replicate"),
    ("shard", DistributedType.NO, 1, None, "replicate"),  # one process: a shard is the whole model
    ("auto", DistributedType.MULTI_GPU, 8, None, "replicate"),  # DDP: the student is whole on each GPU too
    ("auto", DistributedType.MULTI_CPU, 2, None, "replicate"),
    ("auto", DistributedType.FSDP, 2, None, "shard"),
    ("replicate", DistributedType.FSDP, 2, None, "replicate"),  # a teacher that fits: no gathers
    ("shard", DistributedType.MULTI_GPU, 8, None, "shard"),
    ("auto", DistributedType.DEEPSPEED, 8, 3, "shard"),
    ("auto", DistributedType.DEEPSPEED, 8, 2, "replicate"),
    ("replicate", DistributedType.DEEPSPEED, 8, 3, "replicate"),
])
def test_placement_follows_the_recipe_and_the_launch(choice, launch, processes, zero_stage, expected):
    assert choose_placement(choice, launch, processes, zero_stage) == expected


def test_shard_under_deepspeed_needs_zero3():
    with pytest.raises(ConfigError, match="needs ZeRO stage 3"):
        choose_placement("shard", DistributedType.DEEPSPEED, 8, 2)


def test_the_recipe_key_and_that_it_does_not_make_another_run(tmp_path, tiny_llama, tiny_llama_gqa2, shakespeare):
    base = overrides(tiny_llama_gqa2, shakespeare, tmp_path, f"teacher.path={tiny_llama}")
    auto = load_recipe(TINY_RECIPE, base)
    assert auto.teacher.placement == "auto"
    shard = load_recipe(TINY_RECIPE, [*base, "teacher.placement=shard"])
    assert shard.identity() == auto.identity()  # switching placement resumes the same run
    with pytest.raises(ConfigError, match="teacher.placement"):
        load_recipe(TINY_RECIPE, [*base, "teacher.placement=everywhere"])


def test_deepspeed_teacher_config_has_no_optimizer_and_no_auto_values():
    training = {
        "train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 4, "gradient_clipping": 1.0,
        "bf16": {"enabled": True}, "optimizer": {"type": "AdamW"},
        "zero_optimization": {"stage": 3, "offload_param": {"device": "none"}},
    }
    config = deepspeed_teacher_config(training, hidden_size=64)
    assert "optimizer" not in config and "gradient_clipping" not in config
    assert config["zero_optimization"]["stage"] == 3 and config["zero_optimization"]["reduce_bucket_size"] == 4096
    assert config["bf16"] == {"enabled": True}
    assert training["zero_optimization"] == {"stage": 3, "offload_param": {"device": "none"}}  # left as it was
    with pytest.raises(ConfigError, match="'auto' values.*train_micro_batch_size_per_gpu"):
        deepspeed_teacher_config({**training, "train_micro_batch_size_per_gpu": "auto"}, 64)


@pytest.mark.parametrize("mode", ["fully_shard", "fsdp2"])
@pytest.mark.slow
def test_a_sharded_teacher_gives_the_whole_teachers_logits_on_two_cpu_processes(tiny_llama, mode):
    """2 processes, gloo: each holds half of the teacher's weights, and its forward gives the logits of the whole
    model; `fsdp2` runs accelerate's FSDP2 preparation with rank 0's weights broadcast (teacher_worker.py)."""
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         str(HERE / "teacher_worker.py"), str(tiny_llama), mode],
        capture_output=True, text=True, env=ENV, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    # both ranks write to one pipe: their lines can run together ("ok 1ok 0")
    assert sorted(re.findall(r"ok \d", result.stdout)) == ["ok 0", "ok 1"]


@pytest.mark.slow
def test_two_process_distillation_with_a_sharded_teacher_matches_a_replicated_one(
    tmp_path, tiny_llama, tiny_llama_gqa2, shakespeare
):
    """The whole loop under torchrun, 2 CPU processes (DDP student): a sharded teacher trains the student exactly
    as a replicated one does."""
    def train(placement: str) -> Path:
        output = tmp_path / placement
        args = overrides(tiny_llama_gqa2, shakespeare, output, "budget.steps=4", "checkpoint.every=4",
                         "eval.every=4", "log.every=2", "log.trackers=[]", f"teacher.path={tiny_llama}",
                         "teacher.weight=0.5", f"teacher.placement={placement}")
        run = subprocess.run(
            [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
             "-m", "gqa_uptrain.train", str(TINY_RECIPE), *args],
            capture_output=True, text=True, env=ENV, timeout=600,
        )
        assert run.returncode == 0, run.stderr[-3000:]
        described = "sharded over" if placement == "shard" else "replicated on"
        assert f"teacher {tiny_llama}: {described} 2 process(es)" in run.stdout
        return output

    shard, replicate = train("shard"), train("replicate")
    kd = [[r["kd_loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "kd_loss" in r]
          for out in (shard, replicate)]
    assert len(kd[0]) == 2 and kd[0] == pytest.approx(kd[1], rel=1e-5)
    one, two = (load_file(out / "model" / "model.safetensors") for out in (shard, replicate))
    for name in one:
        torch.testing.assert_close(one[name], two[name], rtol=0, atol=1e-5, msg=name)
