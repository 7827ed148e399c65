"""Plan a conversion before touching any data: every output tensor, where it comes from, and its shard.

Planning reads only configs and checkpoint headers, so it is instant even for a 70B model; it powers
`--dry-run`, the progress bar's total, the disk-space check and the writer's layout.
"""

from __future__ import annotations

import json
import os
import re
import statistics
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Collection

from transformers import AutoConfig, PretrainedConfig, PreTrainedModel

from gqa_uptrain.convert.calibration.support import check_supported
from gqa_uptrain.convert.checkpoint_reader import CheckpointReader, TensorInfo
from gqa_uptrain.convert.checkpoint_writer import OutputTensor, assign_shards
from gqa_uptrain.convert.layout import Change, KVLayout, PerHeadModules, check_written_config, find_layout
from gqa_uptrain.convert.methods import METHODS, Method
from gqa_uptrain.convert.options import ConvertOptions
from gqa_uptrain.convert.pooling import pooled_shape
from gqa_uptrain.errors import CheckpointError, ConfigError, InvalidGroupsError, UnsupportedModelError
from gqa_uptrain.kv_heads import (kv_cache_bytes_per_token, kv_heads_keys, meta_model, text_config, text_config_key,
                                  with_kv_heads)
from gqa_uptrain.model_folder import require_inside
from gqa_uptrain.provenance import read_provenance
from gqa_uptrain.sizes import human_size


@dataclass(frozen=True)
class Step:
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
    steps: list[Step]
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
    if not isinstance(raw, dict):
        raise CheckpointError(f"{path}: not a JSON object")
    _check_sizes(path, raw)
    if "quantization_config" in raw or "quantization_config" in (raw.get("text_config") or {}):
        method = (raw.get("quantization_config") or raw["text_config"]["quantization_config"] or {})
        method = method.get("quant_method", "unknown") if isinstance(method, dict) else "unknown"
        raise UnsupportedModelError(f"{path}: a quantized checkpoint ({method}); its K/V weights cannot be pooled "
                                    "exactly beside their scales: convert the unquantized model, then quantize")
    if "auto_map" in raw:
        raise UnsupportedModelError(f"{path}: the model needs custom code (auto_map); only architectures built "
                                    "into transformers are supported")
    try:
        config = AutoConfig.from_pretrained(folder)
    except (ValueError, KeyError) as e:
        raise UnsupportedModelError(f"{path}: transformers does not know this model ({e})") from None
    return raw, config


# Sizes the attention layout is computed from: whole numbers above zero wherever a config names them.
_SIZES = ("num_attention_heads", "num_key_value_heads", "hidden_size", "num_hidden_layers", "head_dim")


def _check_sizes(path: Path, raw: dict) -> None:
    """Refuse a config whose head counts or sizes are not positive whole numbers (`"4"`, 0, 2.5), at the edge."""
    for where, values in (("", raw), ("text_config.", raw.get("text_config"))):
        if not isinstance(values, dict):
            continue
        for key in _SIZES:
            value = values.get(key)
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise CheckpointError(f"{path}: {where}{key} must be a whole number above 0, got {value!r}")


def build_plan(folder: Path, options: ConvertOptions, reader: CheckpointReader | None = None) -> ConversionPlan:
    """Everything the conversion will do, checked against the checkpoint's headers: those of `folder`'s weight
    files, or `reader`'s when given (a Hub model's, read without downloading its weights)."""
    groups = options.groups
    raw, config = load_config(folder)
    try:
        layout = find_layout(config, groups)
    except AttributeError as e:  # e.g. configs whose head counts vary per layer
        raise UnsupportedModelError(f"{folder}: cannot read the attention layout ({e})") from None
    check_written_config(_read_back(_written_config(raw, config, groups)), with_kv_heads(config, groups),
                         layout.model_type)
    reader = reader or CheckpointReader(folder)
    names = checkpoint_names(meta_model(config), reader.tensors)
    _check_complete(names)
    steps = _steps(reader, layout, names)
    _check_exact(reader.tensors, steps)
    fitted = METHODS[options.method].calibrates and bool(layout.changes)
    if fitted:
        check_supported(config, layout, reader.tensors)
        steps = [replace(step, fitted=True) if _is_attention_projection(step.output.name) else step
                 for step in steps]
    return ConversionPlan(folder, raw, config, layout, options, reader, steps,
                          assign_shards([s.output for s in steps], options.max_shard_bytes), fitted)


@dataclass(frozen=True)
class CheckpointNames:
    """How transformers loads a checkpoint into its model class: each parameter's stored name, and the parameters
    it builds from several stored tensors (fused MoE experts), which are not pooled."""

    model: PreTrainedModel  # on the meta device
    stored: dict[str, str]  # parameter name -> checkpoint name
    fused: frozenset[str]


def checkpoint_names(model: PreTrainedModel, tensors: Collection[str]) -> CheckpointNames:
    """Rename the checkpoint's tensors as `from_pretrained` does: with the architecture's own renaming rules (a
    multimodal checkpoint's `language_model.model.*` is the module's `model.language_model.*`) and with or without
    the base model's prefix (a bare base model's checkpoint)."""
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key

    rules = get_model_conversion_mapping(model)
    renamings = [rule for rule in rules if isinstance(rule, WeightRenaming)]
    converters = [rule for rule in rules if isinstance(rule, WeightConverter)]
    params = model.state_dict()
    stored, fused = {}, set()
    for name in tensors:
        renamed, converter = rename_source_key(name, renamings, converters, model.base_model_prefix, params)
        if renamed not in params and name in params:  # as transformers does: a name the rules should not touch
            renamed, converter = rename_source_key(name, [], [], model.base_model_prefix, params)
        if converter is not None:
            fused.add(renamed)
        else:
            stored[renamed] = name
    return CheckpointNames(model, stored, frozenset(fused))


def _check_complete(names: CheckpointNames) -> None:
    """Every parameter the model class has must be in the checkpoint: one left out (an index that forgot a shard)
    would be randomly initialised when the output is loaded. Tied parameters (lm_head tied to the embeddings) are
    one tensor, present under any of their names; buffers are not weights and are not asked for."""
    names_of: dict[int, list[str]] = {}
    for name, param in names.model.named_parameters(remove_duplicate=False):
        if name not in names.fused:  # built from other stored tensors (MoE experts): not checked here
            names_of.setdefault(id(param), []).append(name)
    missing = [tied[0] for tied in names_of.values() if not any(name in names.stored for name in tied)]
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise CheckpointError(f"tensor(s) {', '.join(missing[:3])}{more} missing from the checkpoint, though the "
                              "model has them (an index or shard left out?)")


# Tensor names that hold a quantization's scales or packed integers beside (or instead of) the weights.
_QUANTIZED = re.compile(r"(weight_scale(_inv)?|input_scale|qweight|qzeros|scales|absmax|quant_map)$")


def _check_exact(tensors: dict[str, TensorInfo], steps: list[Step]) -> None:
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


def _is_attention_projection(name: str) -> bool:
    """q/k/v/o projections (and q/k norm weights) of a decoder layer's attention: what a calibrated conversion
    rewrites."""
    return re.search(r"\.self_attn\.((qkv|[qkvo])_proj\.(weight|bias)|[qk]_norm\.weight)$", name) is not None and \
        not name.endswith("o_proj.bias")


@dataclass(frozen=True)
class _Target:
    """What becomes of a checkpoint tensor that a change touches: pooled into `output`, or dropped (None)."""

    change: Change
    output: str | None
    sources: tuple[str, ...]


def _steps(reader: CheckpointReader, layout: KVLayout, names: CheckpointNames) -> list[Step]:
    """Output tensors in the order the source stores them, so reads run front to back through each file."""
    targets = _targets(layout, names)
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


def _targets(layout: KVLayout, names: CheckpointNames) -> dict[str, _Target]:
    """Checkpoint name -> its target, for every tensor a change touches.

    Per-head modules: group g's heads pool into module g, written where the group's first head was read.
    """
    targets: dict[str, _Target] = {}
    ratio = layout.kv_heads // layout.groups
    for change in layout.changes:
        if isinstance(change, PerHeadModules):
            heads = [_in_checkpoint(change.pattern.format(i), names) for i in range(layout.kv_heads)]
            for g in range(layout.groups):
                group = tuple(heads[g * ratio:(g + 1) * ratio])
                targets[group[0]] = _Target(change, heads[g], group)
                targets.update({name: _Target(change, None, ()) for name in group[1:]})
        else:
            name = _in_checkpoint(change.name, names)
            targets[name] = _Target(change, name, (name,))
    return targets


def _in_checkpoint(module_name: str, names: CheckpointNames) -> str:
    """The checkpoint's name for a model parameter."""
    name = names.stored.get(module_name)
    if name is not None:
        return name
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
    how = plan.method.changed
    if plan.fitted:
        refined = plan.options.refine_steps
        how = (f"fitted on {plan.options.calibration or 'the shipped public-domain books'} "
               f"({plan.options.calibration_tokens:,} tokens), "
               + (f"refined up to {refined} steps a layer" if refined else "closed form only"))
    return [
        f"source        {plan.folder} ({layout.model_type}, {layout.query_heads} query heads)",
        f"KV heads      {layout.kv_heads} -> {layout.groups} (method: {plan.method.name})",
        f"KV cache      {kv_before:,} -> {kv_after:,} bytes/token ({kv_after / kv_before:.3f}x); "
        f"at {context:,} tokens: {human_size(kv_before * context)} -> {human_size(kv_after * context)} per sequence",
        f"parameters    {params_before:,} -> {params_after:,} ({params_after - params_before:+,})",
        f"weights       {human_size(plan.source_bytes)} -> {human_size(plan.output_bytes)} in {len(plan.shards)} "
        f"safetensors file(s)",
        f"tensors       {changed} {how}, {len(plan.steps) - changed} copied unchanged",
        *notes(plan),
    ]


TENSOR_PARALLEL = (2, 4, 8)  # common tensor-parallel degrees of serving engines (vLLM, TGI, SGLang)


def splits_over(kv_heads: int, degree: int) -> bool:
    """Whether `kv_heads` KV heads shard over `degree` tensor-parallel ranks as serving engines do it: whole heads
    per rank (degree divides kv_heads), or each head replicated on degree / kv_heads ranks (kv_heads divides it)."""
    return kv_heads % degree == 0 or degree % kv_heads == 0


def tensor_parallel_note(plan: ConversionPlan) -> str | None:
    """One line when the new KV-head count cannot shard over a common TP degree the query heads allow, naming the
    group counts that would (the divisors of the source's KV heads that shard over all of them)."""
    layout = plan.layout
    degrees = [t for t in TENSOR_PARALLEL if layout.query_heads % t == 0]
    bad = [t for t in degrees if not splits_over(layout.groups, t)]
    if not bad:
        return None
    good = [g for g in range(1, layout.kv_heads + 1)
            if layout.kv_heads % g == 0 and all(splits_over(g, t) for t in degrees)]
    return (f"tensor parallel: {layout.groups} KV heads do not shard over {' or '.join(map(str, bad))} GPUs; "
            f"--groups {' or '.join(map(str, good))} would")


def notes(plan: ConversionPlan) -> list[str]:
    """Warnings the dry run and the run both print: a conversion that changes nothing, an unfriendly TP count."""
    layout = plan.layout
    lines = []
    if layout.groups == layout.kv_heads:
        lines.append(f"note: --groups {layout.groups} is the source's KV-head count: nothing changes, the output is "
                     "a copy of the source")
    tp = tensor_parallel_note(plan)
    if tp:
        lines.append(f"warning: {tp}")
    return lines


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


def after_writing(plan: ConversionPlan, source: str, output: Path) -> list[str]:
    """What the run prints after writing: the notes, how to measure the damage, and what to expect by method."""
    layout = plan.layout
    record = (read_provenance(output) or {}).get("conversion", {}).get("calibration")
    lines = [*notes(plan), *(calibration_summary(record["layers"]) if record else []),
             f"measure it: gqa-eval --base {source} --model {output} --perplexity TEXT"]
    if layout.groups < layout.kv_heads:
        lines.append(plan.method.expect)
    return lines


def calibration_summary(layers: list[dict], worst: int = 3) -> list[str]:
    """What a calibrated conversion reports of its layers: the error it fitted, its worst layers, the refinement."""
    errors = {i: layer["held_out_error"] for i, layer in enumerate(layers) if layer.get("held_out_error") is not None}
    if not errors:
        return ["calibration: too few sequences to hold any out, so no error was measured (pass more "
                "--calibration-tokens)"]
    ranked = sorted(errors, key=errors.get, reverse=True)[:worst]
    lines = ["calibration: relative error of each layer's attention output on held-out calibration sequences "
             f"(0: exact; 1: as large as the output itself): median {statistics.median(errors.values()):.3f}; "
             "worst layers " + ", ".join(f"{i} ({errors[i]:.3f})" for i in ranked)]
    refined = [layer["refinement"] for layer in layers if (layer.get("refinement") or {}).get("steps")]
    if refined:
        before = statistics.median(r["held_out_error_before"] for r in refined)
        after = statistics.median(r["held_out_error_after"] for r in refined)
        lines.append(f"refinement: kept in {len(refined)} of {len(layers)} layers; the layer output's held-out error "
                     f"(median) {before:.3f} -> {after:.3f}")
    return lines


def output_config(plan: ConversionPlan) -> dict:
    """The config.json the conversion writes (`build_plan` checked that it describes the converted weights)."""
    return _written_config(plan.raw_config, plan.config, plan.layout.groups)


def _read_back(raw: dict) -> PretrainedConfig:
    """A config.json as transformers will read it once written (AutoConfig decodes what JSON cannot hold, Infinity)."""
    with tempfile.TemporaryDirectory() as folder:
        (Path(folder) / "config.json").write_text(json.dumps(raw))
        return AutoConfig.from_pretrained(folder)


def _written_config(raw: dict, config: PretrainedConfig, groups: int) -> dict:
    """The source's config.json as written, with the new KV head count where the decoder's config keeps it (under
    `text_config` for a multimodal wrapper, whose vision config keeps its own heads)."""
    heads = dict.fromkeys(kv_heads_keys(text_config(config)), groups)
    key = text_config_key(config)
    if key is None:
        return {**raw, **heads}
    return {**raw, key: {**raw.get(key, {}), **heads}}
