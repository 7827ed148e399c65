"""Plan a conversion before touching any data: every output tensor, where it comes from, and its shard.

Planning reads only configs and checkpoint headers, so it is instant even for a 70B model; it powers
`--dry-run`, the progress bar's total, the disk-space check and the writer's layout.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, replace
from pathlib import Path

from transformers import AutoConfig, PretrainedConfig

from gqa_uptrain.convert.calibration.support import check_supported
from gqa_uptrain.convert.checkpoint_io import CheckpointReader, OutputTensor, TensorInfo, assign_shards
from gqa_uptrain.convert.layout import Change, KVLayout, PerHeadModules, find_layout
from gqa_uptrain.convert.methods import METHODS
from gqa_uptrain.convert.pooling import pooled_shape
from gqa_uptrain.errors import CheckpointError, UnsupportedModelError
from gqa_uptrain.kv_heads import kv_cache_bytes_per_token, with_kv_heads
from gqa_uptrain.model_folder import require_inside


@dataclass(frozen=True)
class Step:
    """One output tensor: copied unchanged (`change` is None), pooled from `sources`, or `fitted` on calibration
    text (the calibrated method's q/k/v/o projections)."""

    output: OutputTensor
    sources: tuple[str, ...]
    change: Change | None
    fitted: bool = False


@dataclass(frozen=True)
class CalibrationOptions:
    """What --method calibrated fits on: DATA (None: the default text), at least `tokens` tokens."""

    data: str | None = None
    tokens: int = 32_768


@dataclass(frozen=True)
class ConversionPlan:
    """Every output tensor of a conversion and the shard it goes to, decided from configs and headers alone."""

    folder: Path
    raw_config: dict
    config: PretrainedConfig
    layout: KVLayout
    method: str
    seed: int
    reader: CheckpointReader
    steps: list[Step]
    shards: list[list[OutputTensor]]
    calibration: CalibrationOptions | None = None

    @property
    def output_bytes(self) -> int:
        return sum(step.output.nbytes for step in self.steps)

    @property
    def source_bytes(self) -> int:
        return sum(info.nbytes for info in self.reader.tensors.values())


def load_config(folder: Path) -> tuple[dict, PretrainedConfig]:
    """The source's config.json as written (to copy faithfully) and as transformers reads it."""
    path = folder / "config.json"
    if os.path.lexists(path):
        require_inside(folder, path)
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing; not a Hugging Face model folder") from None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None
    if "auto_map" in raw:
        raise UnsupportedModelError(f"{path}: the model needs custom code (auto_map); only architectures built "
                                    "into transformers are supported")
    try:
        config = AutoConfig.from_pretrained(folder)
    except (ValueError, KeyError) as e:
        raise UnsupportedModelError(f"{path}: transformers does not know this model ({e})") from None
    return raw, config


def build_plan(folder: Path, groups: int, method: str, seed: int = 0,
               max_shard_bytes: int = 5_000_000_000,
               calibration: CalibrationOptions | None = None) -> ConversionPlan:
    """Everything the conversion will do, checked against the checkpoint's headers."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method}")
    raw, config = load_config(folder)
    try:
        layout = find_layout(config, groups)
    except AttributeError as e:  # e.g. configs whose head counts vary per layer
        raise UnsupportedModelError(f"{folder}: cannot read the attention layout ({e})") from None
    reader = CheckpointReader(folder)
    steps = _steps(reader, layout)
    fitted = method == "calibrated" and bool(layout.changes)
    if fitted:
        check_supported(config, layout, reader.tensors)
        steps = [replace(step, fitted=True) if _is_attention_projection(step.output.name) else step
                 for step in steps]
    return ConversionPlan(folder, raw, config, layout, method, seed, reader, steps,
                          assign_shards([s.output for s in steps], max_shard_bytes),
                          (calibration or CalibrationOptions()) if fitted else None)


def _is_attention_projection(name: str) -> bool:
    """q/k/v/o projections of a decoder layer's attention: what a calibrated conversion rewrites."""
    return re.search(r"\.self_attn\.[qkvo]_proj\.(weight|bias)$", name) is not None and not name.endswith(
        "o_proj.bias")


@dataclass(frozen=True)
class _Target:
    """What becomes of a checkpoint tensor that a change touches: pooled into `output`, or dropped (None)."""

    change: Change
    output: str | None
    sources: tuple[str, ...]


def _steps(reader: CheckpointReader, layout: KVLayout) -> list[Step]:
    """Output tensors in the order the source stores them, so reads run front to back through each file."""
    targets = _targets(reader.tensors, layout)
    ordered = sorted(reader.tensors.values(), key=lambda t: (str(t.file), t.offset or 0))
    steps = []
    for info in ordered:
        target = targets.get(info.name)
        if target is None:
            steps.append(Step(OutputTensor(info.name, info.dtype, info.shape), (info.name,), None))
            continue
        _check_shape(info, target.change)
        if target.output is not None:
            shape = pooled_shape(target.change, layout.kv_heads, layout.groups)
            steps.append(Step(OutputTensor(target.output, info.dtype, shape), target.sources, target.change))
    return steps


def _targets(tensors: dict[str, TensorInfo], layout: KVLayout) -> dict[str, _Target]:
    """Checkpoint name -> its target, for every tensor a change touches.

    Per-head modules: group g's heads pool into module g, written where the group's first head was read.
    """
    targets: dict[str, _Target] = {}
    ratio = layout.kv_heads // layout.groups
    for change in layout.changes:
        if isinstance(change, PerHeadModules):
            names = [_in_checkpoint(change.pattern.format(i), tensors) for i in range(layout.kv_heads)]
            for g in range(layout.groups):
                group = tuple(names[g * ratio:(g + 1) * ratio])
                targets[group[0]] = _Target(change, names[g], group)
                targets.update({name: _Target(change, None, ()) for name in group[1:]})
        else:
            name = _in_checkpoint(change.name, tensors)
            targets[name] = _Target(change, name, (name,))
    return targets


def _in_checkpoint(module_name: str, tensors: dict[str, TensorInfo]) -> str:
    """The checkpoint's name for a model parameter (checkpoints of a bare base model lack its prefix)."""
    if module_name in tensors:
        return module_name
    unprefixed = module_name.split(".", 1)[-1]
    if unprefixed in tensors:
        return unprefixed
    raise CheckpointError(f"tensor {module_name} is missing from the checkpoint, though the config says the "
                          "model has it")


def _check_shape(info: TensorInfo, change: Change) -> None:
    if info.shape != change.shape:
        raise CheckpointError(f"{info.file}: tensor {info.name} has shape {list(info.shape)}, but the config "
                              f"implies {list(change.shape)}")


def describe(plan: ConversionPlan, context: int) -> list[str]:
    """The --dry-run report: heads, KV-cache size, parameters and files, before -> after."""
    layout = plan.layout
    new_config = with_kv_heads(plan.config, layout.groups)
    kv_before = kv_cache_bytes_per_token(plan.config)
    kv_after = kv_cache_bytes_per_token(new_config)
    params_before = sum(info.nbytes // info.dtype.itemsize for info in plan.reader.tensors.values())
    params_after = sum(s.output.nbytes // s.output.dtype.itemsize for s in plan.steps)
    changed = sum(step.change is not None or step.fitted for step in plan.steps)
    how = "rewritten"
    if plan.calibration is not None:
        how = (f"fitted on {plan.calibration.data or 'Python standard-library docstrings'} "
               f"({plan.calibration.tokens:,} tokens)")
    return [
        f"source        {plan.folder} ({layout.model_type}, {layout.query_heads} query heads)",
        f"KV heads      {layout.kv_heads} -> {layout.groups} (method: {plan.method})",
        f"KV cache      {kv_before:,} -> {kv_after:,} bytes/token ({kv_after / kv_before:.3f}x); "
        f"at {context:,} tokens: {human_size(kv_before * context)} -> {human_size(kv_after * context)} per sequence",
        f"parameters    {params_before:,} -> {params_after:,} ({params_after - params_before:+,})",
        f"weights       {human_size(plan.source_bytes)} -> {human_size(plan.output_bytes)} in {len(plan.shards)} "
        f"safetensors file(s)",
        f"tensors       {changed} {how}, {len(plan.steps) - changed} copied unchanged",
    ]


def human_size(nbytes: float) -> str:
    """1536 -> '1.5 KiB'."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(nbytes) < 1024:
            return f"{nbytes:.1f} {unit}"
        nbytes /= 1024
    return f"{nbytes:.1f} TiB"
