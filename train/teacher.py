"""Where the frozen distillation teacher lives: replicated on every device, or sharded like the student.

`teacher.placement` in the recipe: `replicate` keeps a whole copy on each device (fastest; it must fit beside the
student), `shard` splits it over the processes (no gradients, no optimizer state: its weights only), `auto` shards
under FSDP and DeepSpeed ZeRO-3 (where the student does not fit one device either) and replicates otherwise. One
process always replicates. How a shard is made:

- accelerate FSDP2 (recipes/accelerate/fsdp.yaml): `fsdp2_prepare_model`, the function accelerate shards the student
  with (one unit per decoder layer, the config's mixed precision and offload; weights read on rank 0 and broadcast
  when `fsdp_cpu_ram_efficient_loading` is set);
- DeepSpeed ZeRO-3: a DeepSpeed engine without optimizer over the training config (as TRL does for reference models),
  the weights partitioned as they load when `zero3_init_flag` is set;
- any other multi-process launch (DDP, CPU): torch's `fully_shard` per decoder layer and at the root.

`accelerator.prepare_model(teacher, evaluation_mode=True)` is not used: under FSDP2 (accelerate 1.15) it neither
shards nor moves the model, and the first forward fails with a device mismatch.
"""

from __future__ import annotations

import copy
import os
from contextlib import contextmanager, nullcontext
from pathlib import Path
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, Literal

import torch
from accelerate import Accelerator, DistributedType
from accelerate.utils import compile_regions
from accelerate.utils.other import compile_regions_fsdp2
from transformers import AutoModelForCausalLM

from gqa_uptrain.errors import ConfigError

from .recipe import Recipe
from .shared_teacher import NotShared, shared_body_teacher
from .trainable import attention_modules

if TYPE_CHECKING:
    from .preflight import Models

Placement = Literal["replicate", "shard"]


def choose_placement(choice: str, distributed_type: DistributedType, num_processes: int,
                     zero_stage: int | None = None) -> Placement:
    """The placement `teacher.placement` asks for under this launch ('auto' resolved); ConfigError if impossible."""
    if num_processes == 1:
        return "replicate"  # one process: a shard would be the whole model
    deepspeed = distributed_type == DistributedType.DEEPSPEED
    if choice == "auto":
        return "shard" if distributed_type == DistributedType.FSDP or (deepspeed and zero_stage == 3) else "replicate"
    if choice == "shard" and deepspeed and zero_stage != 3:
        raise ConfigError(f"teacher.placement=shard under DeepSpeed needs ZeRO stage 3 (the accelerate config has "
                          f"stage {zero_stage}): use teacher.placement=replicate, or recipes/accelerate/"
                          "deepspeed-zero3.yaml")
    return choice  # type: ignore[return-value]


def shared_teacher(accelerator: Accelerator, recipe: Recipe, student: torch.nn.Module,
                   models: Models) -> torch.nn.Module | None:
    """The teacher built around the student's frozen body (shared_teacher.py), where `train.trainable: attention`
    and the launch allow it; None (with the reason, where sharing was possible in principle) to place it apart.
    Call it before the student is prepared: preparing moves the shared modules in place, teacher and all."""
    if recipe.train.trainable != "attention" or recipe.teacher.placement == "shard":
        return None
    if accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED):
        accelerator.print(f"teacher {recipe.teacher.path}: placed apart from the student, whose frozen body "
                          f"{accelerator.distributed_type.value} shards layer by layer")
        return None
    try:
        teacher = shared_body_teacher(student, models.teacher_folder, models.teacher_config,
                                      recipe.model.attn_implementation, accelerator.device)
    except NotShared as reason:
        accelerator.print(f"teacher {recipe.teacher.path}: placed apart from the student ({reason})")
        return None
    own = sum(p.numel() for _, m in attention_modules(teacher) for p in m.parameters())
    accelerator.print(f"teacher {recipe.teacher.path}: shares the student's frozen body; its own attention "
                      f"weights are {own:,} parameters")
    return compile_regions(teacher) if recipe.model.compile else teacher


def place_teacher(accelerator: Accelerator, recipe: Recipe, folder: Path) -> torch.nn.Module:
    """The teacher, frozen and in eval mode, placed as the recipe says. Call it after the student is prepared
    (DeepSpeed fills the 'auto' values of its config then)."""
    spec = recipe.teacher
    plugin = accelerator.state.deepspeed_plugin
    zero_stage = plugin.zero_stage if plugin is not None else None
    placement = choose_placement(spec.placement, accelerator.distributed_type, accelerator.num_processes, zero_stage)
    dtype = torch.bfloat16 if accelerator.mixed_precision == "bf16" else torch.float32
    launch = f" ({accelerator.distributed_type.value})" if accelerator.num_processes > 1 else ""
    accelerator.print(f"teacher {spec.path}: {'sharded over' if placement == 'shard' else 'replicated on'} "
                      f"{accelerator.num_processes} process(es){launch}")
    compile_ = recipe.model.compile
    if placement == "replicate":
        with _whole_weights_on_every_rank(accelerator):
            teacher = _load(folder, recipe, dtype)
        teacher = teacher.to(accelerator.device)
        return compile_regions(teacher) if compile_ else teacher
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        return _deepspeed_shard(accelerator, _load(folder, recipe, dtype), compile_)
    fsdp2 = accelerator.distributed_type == DistributedType.FSDP and accelerator.is_fsdp2
    with nullcontext() if fsdp2 else _whole_weights_on_every_rank(accelerator):
        teacher = _load(folder, recipe, dtype)
    if compile_:
        compile_regions_fsdp2(teacher)  # in place, before sharding, so the FSDP hooks still run (as accelerate does)
    if fsdp2:
        from accelerate.utils.fsdp_utils import fsdp2_prepare_model

        return fsdp2_prepare_model(accelerator, teacher).eval()
    return fully_shard_frozen(teacher)


def fully_shard_frozen(model: torch.nn.Module) -> torch.nn.Module:
    """Shard a frozen model over the default process group: one FSDP2 unit per decoder layer, then the root (the
    embeddings, final norm and head, tied or not), each gathered for its forward and freed after it."""
    from torch.distributed.fsdp import fully_shard

    layers = set(getattr(model, "_no_split_modules", None) or [])
    for module in list(model.modules())[1:]:
        if type(module).__name__ in layers:
            fully_shard(module, reshard_after_forward=True)
    fully_shard(model, reshard_after_forward=True)
    return model.eval()


def deepspeed_teacher_config(training: dict[str, Any], hidden_size: int | None) -> dict[str, Any]:
    """The DeepSpeed config of an inference-only ZeRO-3 engine, from the training one (no optimizer, scheduler or
    gradient settings; buckets sized for the hidden size as TRL does). ConfigError if 'auto' values are left."""
    config = copy.deepcopy(training)
    for key in ("optimizer", "scheduler", "gradient_clipping"):
        config.pop(key, None)
    zero = config.setdefault("zero_optimization", {})
    zero["stage"] = 3
    if hidden_size:
        zero.update({
            "reduce_bucket_size": hidden_size * hidden_size,
            "stage3_param_persistence_threshold": 10 * hidden_size,
            "stage3_prefetch_bucket_size": int(0.9 * hidden_size * hidden_size),
        })
    unresolved = sorted(_auto_keys(config))
    if unresolved:
        raise ConfigError(f"the DeepSpeed config still has 'auto' values for the teacher ({', '.join(unresolved)}): "
                          "set them in the accelerate config, or use teacher.placement=replicate")
    return config


def _deepspeed_shard(accelerator: Accelerator, teacher: torch.nn.Module, compile_: bool) -> torch.nn.Module:
    try:
        import deepspeed
    except ImportError:
        raise ConfigError("teacher.placement=shard under DeepSpeed needs the deepspeed package (pip install "
                          "deepspeed), or use teacher.placement=replicate") from None
    config = deepspeed_teacher_config(accelerator.state.deepspeed_plugin.deepspeed_config,
                                      getattr(teacher.config, "hidden_size", None))
    engine, *_ = deepspeed.initialize(model=teacher, config=config)
    engine.eval()
    if compile_:
        from accelerate.utils.other import compile_regions_deepspeed

        compile_regions_deepspeed(engine.module)
    return engine


def _load(folder: Path, recipe: Recipe, dtype: torch.dtype) -> torch.nn.Module:
    teacher = AutoModelForCausalLM.from_pretrained(
        folder, dtype=dtype, attn_implementation=recipe.model.attn_implementation
    )
    teacher.config.use_cache = False
    return teacher.eval().requires_grad_(False)


@contextmanager
def _whole_weights_on_every_rank(accelerator: Accelerator) -> Iterator[None]:
    """Load real weights on every process, for a model that no `prepare` will broadcast or partition: under
    accelerate's FSDP with cpu_ram_efficient_loading, transformers may read the weights on local rank 0 alone
    (4.x did; 5.x reads them everywhere and treats only buffers apart); under DeepSpeed with zero3_init_flag it
    partitions the weights as they load."""
    name, saved = "FSDP_CPU_RAM_EFFICIENT_LOADING", os.environ.get("FSDP_CPU_RAM_EFFICIENT_LOADING")
    os.environ[name] = "false"
    plugin = accelerator.state.deepspeed_plugin
    try:
        with plugin.zero3_init_context_manager(enable=False) if plugin is not None else nullcontext():
            yield
    finally:
        if saved is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = saved


def _auto_keys(tree: Any, prefix: str = "") -> Iterator[str]:
    if isinstance(tree, dict):
        for key, value in tree.items():
            yield from _auto_keys(value, f"{prefix}{key}.")
    elif tree == "auto":
        yield prefix.rstrip(".")
