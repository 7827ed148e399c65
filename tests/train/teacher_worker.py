"""One process of the 2-process CPU (gloo) check of the sharded teacher, run by test_teacher.py under torchrun.

python teacher_worker.py TEACHER_FOLDER MODE, MODE being `fully_shard` (torch's fully_shard, as under DDP) or
`fsdp2` (accelerate's FSDP2 preparation, with the accelerator's state switched to FSDP2: accelerate 1.15 runs FSDP
only on accelerators, so on the CPU the distributed type is set by hand after a gloo start; rank 1's weights are
zeroed as it loads them, and rank 0's must reach it, as `fsdp_cpu_ram_efficient_loading` promises). Each rank prints
`ok RANK` when the sharded teacher gives the logits of the whole one and holds only its part of the weights.
"""

import os
import sys
from pathlib import Path
from types import SimpleNamespace

import torch
from accelerate import Accelerator, DistributedType
from accelerate.utils import FullyShardedDataParallelPlugin
from torch.distributed.tensor import DTensor
from transformers import AutoModelForCausalLM

from gqa_uptrain.train import teacher as teacher_module
from gqa_uptrain.train.teacher import place_teacher

folder, mode = Path(sys.argv[1]), sys.argv[2]
accelerator = Accelerator(cpu=True)
rank = accelerator.process_index
assert accelerator.num_processes == 2 and accelerator.distributed_type == DistributedType.MULTI_CPU

whole = AutoModelForCausalLM.from_pretrained(folder).eval()  # before any FSDP environment: real weights everywhere
tokens = torch.randint(0, whole.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(rank))
with torch.no_grad():
    expected = whole(input_ids=tokens).logits

if mode == "fsdp2":
    os.environ.update(ACCELERATE_USE_FSDP="true", FSDP_CPU_RAM_EFFICIENT_LOADING="true")
    plugin = FullyShardedDataParallelPlugin(
        fsdp_version=2, auto_wrap_policy="transformer_based_wrap", reshard_after_forward=True,
        cpu_ram_efficient_loading=True, state_dict_type="SHARDED_STATE_DICT",
    )
    accelerator.state.distributed_type = DistributedType.FSDP
    accelerator.state.fsdp_plugin = plugin
    assert accelerator.is_fsdp2
    if rank == 1:  # as if this rank had not read the weights (cpu_ram_efficient_loading): rank 0's must arrive
        load = teacher_module._load

        def unread(*args):
            model = load(*args)
            for parameter in model.parameters():
                parameter.data.zero_()
            return model

        teacher_module._load = unread

recipe = SimpleNamespace(teacher=SimpleNamespace(path=str(folder), placement="shard"),
                         model=SimpleNamespace(compile=False, attn_implementation="sdpa"))
teacher = place_teacher(accelerator, recipe, folder)

weights = dict(teacher.named_parameters())
assert all(isinstance(p, DTensor) and not p.requires_grad for p in weights.values()), "not sharded, or trainable"
local = sum(p.to_local().numel() for p in weights.values())
assert local <= sum(p.numel() for p in whole.parameters()) // 2 + 1024, "each rank holds more than its half"
with torch.no_grad():
    actual = teacher(input_ids=tokens).logits
torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)
print(f"ok {rank}", flush=True)
