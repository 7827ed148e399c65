"""Which parameters get weight decay, also when DeepSpeed ZeRO-3 has replaced them by empty placeholders."""

import torch

from gqa_uptrain.train.optim import build_optimizer, build_schedule
from gqa_uptrain.train.recipe import TrainSpec

SPEC = TrainSpec(lr=1e-3, weight_decay=0.1)


def decayed(optimizer: torch.optim.Optimizer) -> list[int]:
    return [len(group["params"]) for group in optimizer.param_groups if group["weight_decay"] > 0]


def test_matrices_decay_and_norms_do_not():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    optimizer = build_optimizer(model, SPEC)
    assert decayed(optimizer) == [1]  # the one weight matrix; its bias and the norm's two vectors do not decay
    assert sum(len(g["params"]) for g in optimizer.param_groups) == 4


def test_zero3_placeholders_are_grouped_by_their_true_shape():
    """As seen on 2 x H200: under zero.Init every parameter had shape (0,), all fell in the no-decay group, DeepSpeed
    dropped the empty one and the schedule's first step failed on two learning rates for one group."""
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    for parameter in model.parameters():
        parameter.ds_shape = parameter.shape
        parameter.data = torch.empty(0)
    optimizer = build_optimizer(model, SPEC)
    assert decayed(optimizer) == [1]


def test_an_empty_group_is_left_out_and_the_schedule_matches_the_groups():
    model = torch.nn.LayerNorm(4)  # vectors only: nothing to decay
    optimizer = build_optimizer(model, SPEC)
    assert len(optimizer.param_groups) == 1 and decayed(optimizer) == []
    schedule = build_schedule(optimizer, SPEC, total_steps=10)
    optimizer.step()
    schedule.step()
    assert len(schedule.get_last_lr()) == 1
