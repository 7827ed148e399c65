"""Plan a conversion before touching any data: every output tensor, where it comes from, and its shard.

Planning reads only configs and checkpoint headers, so it is instant even for a 70B model; it powers
`--dry-run`, the progress bar's total, the disk-space check and the writer's layout. It also refuses, before any
data is read, what would fail or mislead later: weights that cannot be pooled exactly, a no-op --method random, and
calibration that cannot fit in memory. The source's config is read by `source_config.py`, the checkpoint's names
mapped to the model's by `checkpoint_names.py`, the written config made by `output_config.py`; what the user is told
about a plan is `messages.py`'s.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, replace
from pathlib import Path

from transformers import PretrainedConfig

from gqa_uptrain.convert.calibration.support import check_supported, rewritten_tensors
from gqa_uptrain.convert.checkpoint_names import CheckpointNames, check_complete, checkpoint_names, in_checkpoint
from gqa_uptrain.convert.checkpoint_reader import CheckpointReader, TensorInfo
from gqa_uptrain.convert.checkpoint_writer import OutputTensor, assign_shards
from gqa_uptrain.convert.layout import Change, KVLayout, PerHeadModules, check_written_config, find_layout
from gqa_uptrain.convert.methods import METHODS, Method
from gqa_uptrain.convert.options import ConvertOptions
from gqa_uptrain.convert.output_config import config_with_groups, read_back
from gqa_uptrain.convert.pooling import pooled_shape
from gqa_uptrain.convert.source_config import load_config
from gqa_uptrain.errors import CheckpointError, ConfigError, InvalidGroupsError, UnsupportedModelError
from gqa_uptrain.kv_heads import meta_model, text_config, with_kv_heads
from gqa_uptrain.sizes import human_size


@dataclass(frozen=True)
class TensorPlan:
    """One output tensor: copied unchanged (`change` is None), pooled from `sources`, or `fitted` on calibration
    text (the calibrated method's q/k/v/o projections)."""

    output: OutputTensor
    sources: tuple[str, ...]
    change: Change | None
    fitted: bool = False


@dataclass(frozen=True)
class ConversionPlan:
    """Every output tensor of a conversion and the shard it goes to, decided from configs and headers alone."""

    folder: Path
    raw_config: dict
    config: PretrainedConfig
    layout: KVLayout
    options: ConvertOptions
    reader: CheckpointReader
    steps: list[TensorPlan]
    shards: list[list[OutputTensor]]
    fitted: bool  # q/k/v/o projections fitted on calibration text (--method calibrated, where heads merge)

    @property
    def method(self) -> Method:
        return METHODS[self.options.method]

    @property
    def output_bytes(self) -> int:
        return sum(step.output.nbytes for step in self.steps)

    @property
    def source_bytes(self) -> int:
        return sum(info.nbytes for info in self.reader.tensors.values())


def build_plan(folder: Path, options: ConvertOptions, reader: CheckpointReader | None = None) -> ConversionPlan:
    """Everything the conversion will do, checked against the checkpoint's headers: those of `folder`'s weight
    files, or `reader`'s when given (a Hub model's, read without downloading its weights)."""
    groups = options.groups
    raw, config = load_config(folder)
    try:
        layout = find_layout(config, groups)
    except AttributeError as e:  # e.g. configs whose head counts vary per layer
        raise UnsupportedModelError(f"{folder}: cannot read the attention layout ({e})") from None
    check_written_config(read_back(config_with_groups(raw, config, groups)), with_kv_heads(config, groups),
                         layout.model_type)
    reader = reader or CheckpointReader(folder)
    names = checkpoint_names(meta_model(config), reader.tensors)
    check_complete(names)
    steps = _steps(reader, layout, names)
    _check_exact(reader.tensors, steps)
    fitted = METHODS[options.method].calibrates and bool(layout.changes)
    if fitted:
        check_supported(config, layout, reader.tensors)
        rewritten = rewritten_tensors(config, reader.tensors)  # not a vision tower's attention
        steps = [replace(step, fitted=True) if step.output.name in rewritten else step
                 for step in steps]
    return ConversionPlan(folder, raw, config, layout, options, reader, steps,
                          assign_shards([s.output for s in steps], options.max_shard_bytes), fitted)


# Tensor names that hold a quantization's scales or packed integers beside (or instead of) the weights.
_QUANTIZED = re.compile(r"(weight_scale(_inv)?|input_scale|qweight|qzeros|scales|absmax|quant_map)$")


def _check_exact(tensors: dict[str, TensorInfo], steps: list[TensorPlan]) -> None:
    """Pool only what pooling can convert exactly: floating-point weights of 16 bits or more, no scales."""
    scaled = next((name for name in tensors if _QUANTIZED.search(name)), None)
    if scaled is not None:
        raise UnsupportedModelError(f"tensor {scaled}: a quantized checkpoint (weights with scales); convert the "
                                    "unquantized model, then quantize")
    for step in steps:
        for name in step.sources if step.change is not None else ():
            dtype = tensors[name].dtype
            if not dtype.is_floating_point or dtype.itemsize < 2:
                raise UnsupportedModelError(f"tensor {name} is stored as {str(dtype).removeprefix('torch.')}; only "
                                            "16- and 32-bit float K/V weights can be pooled exactly: convert the "
                                            "unquantized model, then quantize")


@dataclass(frozen=True)
class _Target:
    """What becomes of a checkpoint tensor that a change touches: pooled into `output`, or dropped (None)."""

    change: Change
    output: str | None
    sources: tuple[str, ...]


def _steps(reader: CheckpointReader, layout: KVLayout, names: CheckpointNames) -> list[TensorPlan]:
    """Output tensors in the order the source stores them, so reads run front to back through each file."""
    targets = _targets(layout, names)
    ordered = sorted(reader.tensors.values(), key=lambda t: (str(t.file), t.offset or 0))
    steps = []
    for info in ordered:
        target = targets.get(info.name)
        if target is None:
            steps.append(TensorPlan(OutputTensor(info.name, info.dtype, info.shape), (info.name,), None))
            continue
        _check_shape(info, target.change)
        if target.output is not None:
            shape = pooled_shape(target.change, layout.kv_heads, layout.groups)
            steps.append(TensorPlan(OutputTensor(target.output, info.dtype, shape), target.sources, target.change))
    return steps


def _targets(layout: KVLayout, names: CheckpointNames) -> dict[str, _Target]:
    """Checkpoint name -> its target, for every tensor a change touches.

    Per-head modules: group g's heads pool into module g, written where the group's first head was read.
    """
    targets: dict[str, _Target] = {}
    ratio = layout.kv_heads // layout.groups
    for change in layout.changes:
        if isinstance(change, PerHeadModules):
            heads = [in_checkpoint(change.pattern.format(i), names) for i in range(layout.kv_heads)]
            for g in range(layout.groups):
                group = tuple(heads[g * ratio:(g + 1) * ratio])
                targets[group[0]] = _Target(change, heads[g], group)
                targets.update({name: _Target(change, None, ()) for name in group[1:]})
        else:
            name = in_checkpoint(change.name, names)
            targets[name] = _Target(change, name, (name,))
    return targets


def _check_shape(info: TensorInfo, change: Change) -> None:
    if info.shape != change.shape:
        raise CheckpointError(f"{info.file}: tensor {info.name} has shape {list(info.shape)}, but the config "
                              f"implies {list(change.shape)}")


def refuse_no_op(plan: ConversionPlan) -> None:
    """A method that draws new weights (--method random), at G = the source's KV heads, would copy the source, not
    draw new projections: refuse."""
    method, layout = plan.method, plan.layout
    if method.redraws and layout.groups == layout.kv_heads:
        raise InvalidGroupsError(f"--method {method.name} with --groups {layout.groups}, the source's KV heads, would "
                                 "copy the source unchanged (nothing is re-initialised when no heads merge); "
                                 "choose a smaller --groups")


# What --method calibrated keeps for the whole run, per calibration token and hidden unit: the original and the
# converted hidden states and the original attention output, in fp32 (calibration/calibrate.py).
_CALIBRATION_BYTES = 3 * 4


def check_calibration_memory(plan: ConversionPlan) -> None:
    """Refuse, before any text is read, --calibration-tokens whose hidden states cannot fit in the memory the
    calibration runs in (the GPU's when there is one): the allocation would fail minutes later, in a traceback."""
    if not plan.fitted:
        return
    hidden, tokens = text_config(plan.config).hidden_size, plan.options.calibration_tokens
    need = tokens * hidden * _CALIBRATION_BYTES
    available, where = _available_memory()
    if need > available:
        fits = available // (hidden * _CALIBRATION_BYTES)
        raise ConfigError(f"--calibration-tokens {tokens:,} needs about {human_size(need)} for the hidden states "
                          f"(tokens x hidden size {hidden} x 4 bytes x 3), more than the {human_size(available)} of "
                          f"{where} here; use at most {fits:,}")


def _available_memory() -> tuple[int, str]:
    """Bytes the calibration may still take, and of what: free GPU memory, or the memory Linux can give without
    swapping (MemAvailable, which counts the page cache it can drop; free pages where /proc is not there)."""
    import torch

    if torch.cuda.is_available():
        return torch.cuda.mem_get_info()[0], "free GPU memory"
    try:
        with open("/proc/meminfo") as meminfo:
            kib = next(int(line.split()[1]) for line in meminfo if line.startswith("MemAvailable:"))
        return kib * 1024, "available memory"
    except (OSError, StopIteration, ValueError, IndexError):
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES"), "free memory"
