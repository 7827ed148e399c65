"""One process of the 2-process CPU (gloo) training run under FSDP2, run by test_fsdp_cpu.py under torchrun.

python fsdp_cpu_worker.py RECIPE [key=value ...]: `gqa-uptrain` itself, with every Accelerator switched to FSDP2
right after it is built. accelerate 1.15 runs FSDP only on accelerators: AcceleratorState.__init__ turns an FSDP
plugin or ACCELERATE_USE_FSDP into DistributedType.FSDP only when PartialState found MULTI_GPU/MLU/SDAA/MUSA/NPU/
XPU/HPU/NEURON; a gloo start with cpu=True is MULTI_CPU, and there the plugin is silently ignored (the model is
wrapped in DDP). So the distributed type (in both shared states, AcceleratorState's and PartialState's, else
save_state reads MULTI_CPU again) and the plugin are set by hand, as recipes/accelerate/fsdp.yaml sets them on GPUs.
Everything after that is accelerate's and the loop's own FSDP2 path: fully_shard per decoder layer, rank 0's weights
broadcast, sharded checkpoints, the gathered export.
"""

import os
import runpy
import sys

from accelerate import Accelerator, DistributedType, PartialState
from accelerate.utils import FullyShardedDataParallelPlugin

build = Accelerator.__init__


def build_with_fsdp2(self, *args, **kwargs):
    build(self, *args, **kwargs)
    assert self.distributed_type == DistributedType.MULTI_CPU and self.num_processes == 2, self.distributed_type
    os.environ.update(ACCELERATE_USE_FSDP="true", FSDP_CPU_RAM_EFFICIENT_LOADING="true")
    self.state.fsdp_plugin = FullyShardedDataParallelPlugin(
        fsdp_version=2, auto_wrap_policy="transformer_based_wrap", reshard_after_forward=True,
        cpu_ram_efficient_loading=True, state_dict_type="SHARDED_STATE_DICT",
    )
    self.state.distributed_type = DistributedType.FSDP
    PartialState().distributed_type = DistributedType.FSDP  # a separate shared state, read again later
    assert self.is_fsdp2


Accelerator.__init__ = build_with_fsdp2
sys.argv = ["gqa-uptrain", *sys.argv[1:]]
runpy.run_module("gqa_uptrain.train", run_name="__main__", alter_sys=True)
