"""What a run needs before it starts: memory per GPU, time, and how many GPUs it takes to fit (`--dry-run`).

Memory per GPU, as gqa-uptrain trains (fp32 master weights, bf16 autocast, AdamW, SDPA attention, HF Llama-style
decoder layers):
- model states, 16 bytes a parameter: fp32 weights 4, fp32 gradients 4, AdamW's two fp32 moments 8; split over
  the processes under FSDP / ZeRO-3, whole on every GPU under DDP or on one GPU;
- bf16 weights: autocast's cached bf16 copy of every weight (2 bytes a parameter) on one GPU or under DDP; under
  FSDP the bf16 weights of the layers being gathered (two layers at a time);
- activations of one micro-batch, per token and layer, in bytes: 36 x hidden (two RMSNorms on the fp32 residual
  stream, the bf16 casts, q, rotated q, attention output, o_proj input) + 6 x KV width (k, v, rotated k) +
  8 x intermediate (gate, up, SiLU, product); with activation checkpointing only each layer's fp32 input is kept,
  plus one layer's activations while it is recomputed;
- the LM head and loss: 10 bytes per token and vocabulary entry (bf16 logits, their fp32 copy, log-softmax); a
  teacher adds its bf16 logits and the distillation loss's two fp32 distributions (8 more);
- the teacher: bf16 weights, whole or split over the processes as `teacher.placement` says.

Checked against measurements (issue 13; 2 x H200, torch 2.11, accelerate 1.15): a 1.34B MHA Llama converted to
GQA-4 (1.175B parameters: hidden 2048, 22 layers, 32 heads, intermediate 5632, vocab 50257), seq 2048, micro-batch 8,
bf16, eager: the estimate is 67.8 GiB on one GPU (measured 70.0: -3%) and 57.0 GiB per GPU under FSDP2 on two
(measured 54.6: +4%). tests/train/test_estimate.py holds both figures. Compiled runs use less (44.9 GiB measured
under FSDP2): the estimate is for eager runs, an upper bound for compiled ones.

Time: the budget's FLOPs (6 x matmul parameters + attention, `budget.py`; a teacher's forward adds 2 x its matmul
parameters a token) over the GPUs' datasheet dense bf16 peak at an assumed MFU (40% by default, about what the
eager loop reaches: docs/benchmarks.md).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

from transformers import PretrainedConfig

from gqa_uptrain.errors import CheckpointError, ConfigError, one_line
from gqa_uptrain.sizes import human_size

from .budget import TrainingBudget, matmul_params, plan_budget
from .recipe import Recipe

Parallel = Literal["single", "ddp", "fsdp"]
GIB = 2**30
# Dense bf16 tensor-core peaks from the vendors' data sheets, TFLOP/s per GPU (SXM parts; the 4090's with fp32
# accumulation), and memory in GiB.
GPUS: dict[str, tuple[float, float]] = {
    "h100": (989.4, 79.6), "h200": (989.4, 139.8), "a100": (312.0, 79.3), "l40s": (362.1, 44.4),
    "4090": (165.2, 23.6),
}
DEFAULT_MFU = 0.40


@dataclass(frozen=True)
class Shape:
    """What memory depends on, read from a model config."""

    params: int
    layers: int
    hidden: int
    kv_width: int
    intermediate: int
    vocab: int
    attention_params: int = 0  # of the attention projections: what `train.trainable: attention` trains

    @classmethod
    def of(cls, config: PretrainedConfig) -> Shape:
        from gqa_uptrain.kv_heads import head_dim, meta_model

        from .trainable import attention_parameter_names

        kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
        intermediate = getattr(config, "intermediate_size", None) or 4 * config.hidden_size
        model = meta_model(config)
        attention = attention_parameter_names(model)
        named = dict(model.named_parameters())
        return cls(sum(p.numel() for p in named.values()), config.num_hidden_layers, config.hidden_size,
                   kv_heads * head_dim(config), intermediate, config.vocab_size,
                   sum(named[n].numel() for n in attention))

    def activation_bytes_per_token_layer(self) -> int:
        return 36 * self.hidden + 6 * self.kv_width + 8 * self.intermediate


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes per GPU, by what holds them."""

    weights: float  # fp32 master weights (this GPU's share)
    gradients: float
    optimizer: float  # AdamW moments
    bf16_weights: float  # autocast's cache, or FSDP's gathered layers
    activations: float  # one micro-batch, no activation checkpointing
    activations_checkpointed: float  # one micro-batch, with it
    logits: float  # LM head and loss (and distillation's)
    teacher: float  # teacher weights

    def total(self, checkpointing: bool) -> float:
        acts = self.activations_checkpointed if checkpointing else self.activations
        return (self.weights + self.gradients + self.optimizer + self.bf16_weights + acts + self.logits
                + self.teacher)


def estimate_memory(student: Shape, micro_batch: int, seq_len: int, parallel: Parallel, processes: int,
                    teacher: Shape | None = None, teacher_sharded: bool = False, *, attention_only: bool = False,
                    frozen_bytes: int = 4, teacher_shared: bool = False) -> MemoryEstimate:
    """Per-GPU memory of training `student` (the module docstring says what each term counts and how well it fits).

    `attention_only`: only the attention projections learn; the frozen rest takes `frozen_bytes` a parameter (the
    checkpoint's dtype; fp32 under FSDP, which flattens it with the trainable fp32 weights). `teacher_shared`: the
    teacher shares the student's frozen body and adds its attention weights alone, in the same dtype.
    """
    shards = processes if parallel == "fsdp" else 1
    tokens = micro_batch * seq_len
    per_layer = student.activation_bytes_per_token_layer() * tokens
    learn = student.attention_params if attention_only else student.params
    frozen = (student.params - learn) * (4 if parallel == "fsdp" else frozen_bytes)
    bf16 = 2 * learn if parallel != "fsdp" else 2 * 2 * student.params / max(student.layers, 1)
    logits = 10 * student.vocab * tokens + (8 * teacher.vocab * tokens if teacher else 0)
    if teacher is None:
        teacher_bytes = 0.0
    elif teacher_shared:
        teacher_bytes = frozen_bytes * teacher.attention_params
    else:
        teacher_bytes = 2 * teacher.params / (processes if teacher_sharded else 1)
    return MemoryEstimate(
        weights=(4 * learn + frozen) / shards,
        gradients=4 * learn / shards,
        optimizer=8 * learn / shards,
        bf16_weights=bf16,
        activations=per_layer * student.layers,
        activations_checkpointed=4 * student.hidden * tokens * student.layers + per_layer,
        logits=logits,
        teacher=teacher_bytes,
    )


def gpus_to_fit(student: Shape, micro_batch: int, seq_len: int, gpu_bytes: float, checkpointing: bool,
                teacher: Shape | None = None, limit: int = 1024, **setup) -> int | None:
    """The fewest GPUs (FSDP, teacher sharded) on which a micro-batch fits in `gpu_bytes`; None: not even `limit`.
    `setup`: estimate_memory's keywords (the trainable set; a teacher shares the body on one GPU only)."""
    shared = setup.pop("teacher_shared", False)
    for n in (1, *(2**k for k in range(1, int(math.log2(limit)) + 1))):
        parallel: Parallel = "single" if n == 1 else "fsdp"
        need = estimate_memory(student, micro_batch, seq_len, parallel, n, teacher, teacher_sharded=n > 1,
                               teacher_shared=shared and n == 1, **setup)
        if need.total(checkpointing) <= gpu_bytes:
            return n
    return None


def training_seconds(flops: float, gpu: str, processes: int, mfu: float = DEFAULT_MFU) -> float:
    """Wall time of `flops` on `processes` GPUs of kind `gpu` at model FLOPs utilisation `mfu`."""
    return flops / (peak(gpu) * 1e12 * processes * mfu)


def peak(gpu: str) -> float:
    """The datasheet dense bf16 TFLOP/s of `gpu` (a key of GPUS); ConfigError naming the known ones."""
    if gpu.lower() not in GPUS:
        raise ConfigError(f"--gpu {gpu}: unknown GPU; choose one of {', '.join(GPUS)}")
    return GPUS[gpu.lower()][0]


def parallel_of_accelerate_config(distributed_type: str | None, processes: int) -> Parallel:
    """accelerate's distributed_type -> how the model states are held (ZeRO-3 splits them as FSDP does)."""
    if distributed_type in ("FSDP", "DEEPSPEED"):
        return "fsdp"
    return "ddp" if processes > 1 else "single"


def gib(nbytes: float) -> str:
    """Every figure of the estimate in GiB, the unit GPUs are sized in, so that its rows compare at a glance."""
    return human_size(nbytes, "GiB")


@dataclass(frozen=True)
class Setup:
    """How a run holds what it trains: the launch, the batch, what learns and where the teacher lives."""

    micro_batch: int
    seq_len: int
    parallel: Parallel
    processes: int
    checkpointing: bool
    attention_only: bool = False
    frozen_bytes: int = 4  # a frozen parameter, in the checkpoint's dtype
    teacher: Shape | None = None
    teacher_sharded: bool = False
    teacher_shared: bool = False  # built around the student's frozen body (train/shared_teacher.py)

    def memory(self, student: Shape) -> MemoryEstimate:
        return estimate_memory(student, self.micro_batch, self.seq_len, self.parallel, self.processes, self.teacher,
                               self.teacher_sharded, attention_only=self.attention_only,
                               frozen_bytes=self.frozen_bytes, teacher_shared=self.teacher_shared)

    def gpus_to_fit(self, student: Shape, gpu_bytes: float, checkpointing: bool) -> int | None:
        return gpus_to_fit(student, self.micro_batch, self.seq_len, gpu_bytes, checkpointing, self.teacher,
                           attention_only=self.attention_only, frozen_bytes=self.frozen_bytes,
                           teacher_shared=self.teacher_shared)


def estimate_block(student: Shape, setup: Setup, flops: float, gpu: str, mfu: float) -> str:
    """The estimate block of the dry run; `flops` of the whole run, teacher forwards included."""
    m = setup.memory(student)
    tflops, gpu_gib = GPUS[gpu.lower()]
    seconds = training_seconds(flops, gpu, setup.processes, mfu)
    checkpointing = setup.checkpointing
    on = "with" if checkpointing else "without"
    learn = student.attention_params if setup.attention_only else student.params
    lines = [
        f"memory per GPU       {setup.parallel} over {setup.processes} process(es), micro-batch "
        f"{setup.micro_batch} x {setup.seq_len}, {learn:,} of {student.params:,} parameters trained:",
        f"  weights            {gib(m.weights)}; gradients {gib(m.gradients)}; AdamW {gib(m.optimizer)}; "
        f"bf16 copies {gib(m.bf16_weights)}",
        f"  activations        {gib(m.activations)} without activation checkpointing, "
        f"{gib(m.activations_checkpointed)} with; logits and loss {gib(m.logits)}",
    ]
    if setup.teacher is not None:
        where = ("shares the student's frozen body: its attention only" if setup.teacher_shared
                 else "sharded" if setup.teacher_sharded else "replicated")
        lines.append(f"  teacher            {gib(m.teacher)} ({where})")
    lines.append(f"  total              {gib(m.total(checkpointing))} ({on} activation checkpointing, as the recipe "
                 f"says; {gib(m.total(not checkpointing))} {'without' if checkpointing else 'with'}); "
                 f"estimate within about 5% of measured eager runs")
    alone = Setup(**{**vars(setup), "parallel": "single", "processes": 1, "teacher_sharded": False,
                     "teacher_shared": setup.teacher is not None and setup.attention_only})
    need = alone.memory(student).total(checkpointing)
    verdict = "fits" if need <= gpu_gib * GIB else "does not fit"
    lines.append(f"{'one ' + gpu:<21}{verdict}: {gib(need)} of its {gpu_gib:g} GiB, as one process")
    fits = [setup.gpus_to_fit(student, gpu_gib * GIB, c) for c in (checkpointing, True)]
    needed = "more than 1024" if fits[0] is None else str(fits[0])
    line = f"GPUs to fit          {needed} x {gpu} ({gpu_gib:g} GiB) under FSDP"
    if not checkpointing and fits[1] is not None and fits[1] != fits[0]:
        line += f"; {fits[1]} with activation checkpointing"
    lines.append(line)
    lines.append(f"time                 {seconds / 3600:.2f} h on {setup.processes} x {gpu} ({tflops:g} TFLOP/s bf16 "
                 f"datasheet peak) at {mfu:.0%} MFU")
    return "\n".join(lines)


def dry_run(recipe: Recipe, processes: int, gpu: str = "h100", mfu: float = DEFAULT_MFU,
            parallel: Parallel | None = None) -> str:
    """The whole `--dry-run` text for `recipe` on `processes` GPUs: the budget, memory, time, micro-batch.

    Reads configs only: no weights, no tokenizer. A recipe's `convert` section (a PlanningRecipe's or a
    PipelineRecipe's) lets it plan before the conversion (from the source's config with `convert.groups` KV heads),
    and its `accelerate_config` says how the model states are held unless `parallel` does. gqa-uptrain and gqa-pipeline call this one function.
    """
    if not 0 < mfu <= 1:
        raise ConfigError(f"--mfu must be in (0, 1], got {mfu}")
    peak(gpu)
    if processes < 1:
        raise ConfigError(f"--num-processes must be at least 1, got {processes}")
    models = planned_models(recipe)
    budget = plan_budget(recipe.budget, recipe.batch, recipe.data.seq_len, processes, models.student, models.original)
    if parallel is None:
        parallel = parallel_of_accelerate_config(accelerate_distributed_type(recipe), processes)
    student = Shape.of(models.student)
    setup = _setup(recipe, models, student, parallel, processes)
    flops = _run_flops(budget, models, student, setup)
    return "\n".join([f"gqa-uptrain plan for {recipe.model.path} on {processes} process(es){models.origin}:",
                      budget.describe(), estimate_block(student, setup, flops, gpu, mfu),
                      micro_batch_line(student, setup, gpu, recipe.batch.global_batch)])


@dataclass(frozen=True)
class PlannedModels:
    """The configs a dry run plans from."""

    student: PretrainedConfig
    original: PretrainedConfig  # the pretrained model, for the fraction of pretraining
    teacher: PretrainedConfig | None
    origin: str = ""  # said after the plan's first line when the student is not read from model.path


def planned_models(recipe: Recipe) -> PlannedModels:
    """The student's config from model.path when it holds a model, else from the recipe's `convert` section (the
    source's config with `convert.groups` KV heads, checked as gqa-convert checks them)."""
    from .budget import original_config
    from .export import source_provenance
    from .preflight import _check_seq_len

    convert = getattr(recipe, "convert", None)
    folder = Path(recipe.model.path).expanduser()
    teacher = _config(recipe.teacher.path, "teacher") if recipe.teacher else None
    if folder.is_dir() or convert is None:
        student = _config(recipe.model.path, "model")
        original = original_config(student, source_provenance(folder) if folder.is_dir() else None)
        origin = ""
    else:
        original, student = _converted_config(convert.source, convert.groups)
        origin = f" (not converted yet: planned from {convert.source} with convert.groups={convert.groups} KV heads)"
    _check_seq_len(student, recipe.data.seq_len, "model", recipe.model.path)
    if teacher is not None:
        _check_seq_len(teacher, recipe.data.seq_len, "teacher", recipe.teacher.path)
    return PlannedModels(student, teacher or original, teacher, origin)


def _converted_config(source: str, groups: int) -> tuple[PretrainedConfig, PretrainedConfig]:
    """(source's config, the config gqa-convert would write for `groups` KV heads). Whether gqa-convert accepts
    the architecture is its own check (gqa-pipeline's dry run runs it); the head count is checked here."""
    from gqa_uptrain.kv_heads import kv_heads_of, with_kv_heads

    config = _config(source, "convert.source")
    heads = kv_heads_of(config)
    if heads % groups:
        raise ConfigError(f"convert.groups={groups} does not divide {source}'s {heads} KV heads")
    return config, with_kv_heads(config, groups)


def _config(path: str, role: str) -> PretrainedConfig:
    """A model's config alone (a Hub id downloads config.json only); one CheckpointError line if there is none."""
    from transformers import AutoConfig

    from gqa_uptrain.source import looks_local

    folder = Path(path).expanduser()
    if looks_local(path) and not folder.is_dir():
        raise CheckpointError(f"{role} {path}: no such folder")
    try:
        return AutoConfig.from_pretrained(folder if folder.is_dir() else path)
    except (OSError, ValueError) as error:
        raise CheckpointError(f"{role} {path}: {one_line(error)}") from None


def _setup(recipe: Recipe, models: PlannedModels, student: Shape, parallel: Parallel, processes: int) -> Setup:
    """How the recipe holds the student and its teacher under `parallel` on `processes` GPUs."""
    teacher = Shape.of(models.teacher) if models.teacher is not None else None
    placement = recipe.teacher.placement if recipe.teacher else "auto"
    sharded = teacher is not None and processes > 1 and (
        placement == "shard" or (placement == "auto" and parallel == "fsdp"))
    attention_only = recipe.train.trainable == "attention"
    return Setup(recipe.batch.micro_batch, recipe.data.seq_len, parallel, processes,
                 recipe.model.gradient_checkpointing, attention_only, _dtype_bytes(models.student.dtype), teacher,
                 sharded, teacher_shared=teacher is not None and attention_only and parallel != "fsdp"
                 and placement != "shard")


def _run_flops(budget: TrainingBudget, models: PlannedModels, student: Shape, setup: Setup) -> float:
    """The run's FLOPs: the budget's, less the weight gradients frozen weights skip, plus the teacher's forwards."""
    flops = budget.flops
    if setup.attention_only:  # frozen weights take no weight-gradient product: 4 x N + 2 x trained, not 6 x N
        linear = matmul_params(models.student)
        flops *= (4 * linear + 2 * student.attention_params) / (6 * linear)
    if models.teacher is not None:
        flops += 2.0 * matmul_params(models.teacher) * budget.tokens
    return flops


def largest_micro_batch(student: Shape, setup: Setup, gpu_bytes: float, global_batch: int) -> int | None:
    """The largest micro-batch that fits `gpu_bytes` as `setup` holds the model and divides the batch each process
    takes a step (`global_batch` / processes, so that gradient accumulation is whole); None: not even 1."""
    per_process = global_batch // setup.processes
    for size in range(per_process, 0, -1):
        fits = replace(setup, micro_batch=size).memory(student).total(setup.checkpointing) <= gpu_bytes
        if per_process % size == 0 and fits:
            return size
    return None


def micro_batch_line(student: Shape, setup: Setup, gpu: str, global_batch: int) -> str:
    """What micro-batch to set for one GPU of kind `gpu`, as the recipe holds the model."""
    gpu_gib = GPUS[gpu.lower()][1]
    size = largest_micro_batch(student, setup, gpu_gib * GIB, global_batch)
    if size is None:
        return (f"micro-batch          not even 1 fits one {gpu} ({gpu_gib:g} GiB) as set up here: more GPUs under "
                f"FSDP (above){'' if setup.checkpointing else ', or model.gradient_checkpointing=true'}")
    need = replace(setup, micro_batch=size).memory(student).total(setup.checkpointing)
    return (f"micro-batch          at most {size} on one {gpu} ({gib(need)} of {gpu_gib:g} GiB): batch.micro_batch="
            f"{size}, gradient accumulation {global_batch // (size * setup.processes)}")


def _dtype_bytes(dtype) -> int:
    """Bytes a parameter of the checkpoint's dtype (a name or a torch dtype; fp32 when the config says none)."""
    name = str(dtype or "float32").removeprefix("torch.")
    return 2 if name in ("bfloat16", "float16") else 4


def accelerate_config_file(name: str) -> Path:
    """The file a recipe's `accelerate_config` names, by the one rule gqa-pipeline and scripts/launch.sh follow too:
    relative to the current directory, like every path in a recipe (accelerate is handed it as written). A name
    that is no file is one ConfigError line: planning for DDP in its place would be silently wrong."""
    path = Path(name).expanduser()
    if not path.is_file():
        where = "" if path.is_absolute() else f" (relative to the current directory, {Path.cwd()})"
        raise ConfigError(f"accelerate_config {name} is not a file{where}: run from the folder the recipe's paths "
                          "are relative to, or give its absolute path")
    return path


def accelerate_distributed_type(recipe: Recipe) -> str | None:
    """distributed_type of the accelerate config a PipelineRecipe names (`accelerate_config`), None without one."""
    import yaml

    name = getattr(recipe, "accelerate_config", None)
    if not name:
        return None
    path = accelerate_config_file(name)
    try:
        tree = yaml.safe_load(path.read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as error:
        raise ConfigError(f"accelerate_config {name}: {one_line(error)}") from None
    return tree.get("distributed_type") if isinstance(tree, dict) else None
