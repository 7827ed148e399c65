"""The uptraining run: checks, setup, then the step loop, read top to bottom in `_run` (`_Training` takes the steps).

One optimizer step = `grad_accum` micro-batches (each `micro_batch` x `seq_len` tokens on every process) under
`accelerator.accumulate`, gradient clipping, AdamW, a scheduler step. Logging, evaluation and checkpoints
happen at step boundaries, when `cadence.py` says, so a resumed run restarts at exactly the step after its
checkpoint.
"""

from __future__ import annotations

import os
import time
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import torch
from accelerate import Accelerator, DistributedType, PartialState
from accelerate.state import AcceleratorState, GradientState
from accelerate.utils import (
    DataLoaderConfiguration,
    GradientAccumulationPlugin,
    ProjectConfiguration,
    TorchDynamoPlugin,
    set_seed,
)
from torch import Tensor
from torch.optim.lr_scheduler import LambdaLR
from transformers import AutoModelForCausalLM, PreTrainedModel

from gqa_uptrain.documents import naming_undecodable_files
from gqa_uptrain.errors import CheckpointError, ConfigError
from gqa_uptrain.provenance import Provenance

from . import checkpoint, data, disk, distill, run_lock
from .budget import TrainingBudget, original_config, plan_budget
from .cadence import Cadence
from .export import export_model, source_provenance
from .history import History
from .launcher import watch_launcher
from .loss_curve import plot_loss_curve
from .losses import Divergence, LossWindow
from .optim import build_optimizer, build_schedule
from .preflight import (Models, check_attention, check_data_unchanged, check_model_unchanged, check_models,
                        check_output_dir, write_fingerprints, write_snapshot)
from .progress import Progress
from .recipe import Recipe
from .recovery import Gap
from .result import UptrainingResult, finished_run
from .teacher import place_teacher, shared_teacher
from .throughput import Throughput, peak_memory, peak_tflops
from .trackers import check_trackers, flat_config
from .trainable import select_trainable


def _precision(recipe: Recipe) -> str:
    """accelerate's mixed_precision value: bf16 autocast over fp32 master weights on GPUs that support it."""
    choice = recipe.train.precision
    if choice == "auto":
        return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"
    return "no" if choice == "fp32" else choice


def _accelerator(recipe: Recipe, budget: TrainingBudget) -> Accelerator:
    output = Path(recipe.output_dir)
    accelerator = Accelerator(
        cpu=not torch.cuda.is_available(),
        mixed_precision=_precision(recipe),
        gradient_accumulation_plugin=GradientAccumulationPlugin(num_steps=budget.grad_accum,
                                                                sync_with_dataloader=False),
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=recipe.seed),
        dynamo_plugin=TorchDynamoPlugin(backend="inductor", use_regional_compilation=True)
        if recipe.model.compile
        else None,
        log_with=recipe.log.trackers or None,
        project_config=ProjectConfiguration(project_dir=str(output), logging_dir=str(output / "logs")),
    )
    return accelerator


def _load_model(path: Path, recipe: Recipe, dtype: torch.dtype) -> PreTrainedModel:
    attention = recipe.model.attn_implementation
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation=attention)
    model.config.use_cache = False
    return model


def _frozen_dtype(recipe: Recipe, accelerator: Accelerator, checkpoint_dtype) -> torch.dtype | None:
    """The dtype frozen parameters are held in: the checkpoint's, where autocast runs the matrix products in half
    precision anyway; None (everything fp32) where everything learns, where FSDP or ZeRO-3 flatten frozen and
    trainable parameters into one buffer of one dtype, or where the run is in fp32 (a bf16 weight would meet fp32
    activations without autocast)."""
    sharded = accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED)
    if recipe.train.trainable == "all" or sharded or accelerator.mixed_precision == "no":
        return None
    dtype = getattr(torch, checkpoint_dtype) if isinstance(checkpoint_dtype, str) else checkpoint_dtype
    return dtype or torch.float32


def _forward(model, teacher, input_ids: torch.Tensor, recipe: Recipe,
             accelerator: Accelerator) -> tuple[Tensor, Tensor, Tensor | None]:
    """(objective, LM loss, distillation loss or None) for one micro-batch."""
    out = model(input_ids=input_ids, labels=input_ids)
    if teacher is None:
        return out.loss, out.loss, None
    with accelerator.autocast():  # the student's forward runs under it too (accelerate wraps it)
        target = distill.teacher_logits(teacher, input_ids)
    kd_loss = distill.distillation_loss(out.logits, target, recipe.teacher.temperature)
    return distill.mix(out.loss, kd_loss, recipe.teacher.weight), out.loss, kd_loss


@torch.no_grad()
def validation_loss(accelerator: Accelerator, model, loader) -> float:
    """Mean LM loss over the fixed validation batches of every process (the model's train/eval mode is kept)."""
    training = model.training
    model.eval()
    with accelerator.autocast():  # a prepared model autocasts anyway; a teacher placed apart needs it here
        losses = [model(input_ids=batch["input_ids"], labels=batch["input_ids"]).loss.float() for batch in loader]
    model.train(training)
    return accelerator.gather(torch.stack(losses)).mean().item()


def _validate(accelerator: Accelerator, model, loader, history: History, step: int, tokens: int,
              progress: Progress, gap: Gap | None, teacher=None) -> None:
    """Log and print the validation loss (and perplexity) after `step` optimizer steps, with the share of the gap to
    the teacher's loss recovered; given the `teacher` (at step 0), its loss on the same batches is the reference."""
    val_loss = validation_loss(accelerator, model, loader)
    record = {"val_loss": val_loss, "val_ppl": float(torch.tensor(val_loss).exp()), "tokens": tokens}
    if teacher is not None:
        record["reference_val_loss"] = validation_loss(accelerator, teacher, loader)
        gap = Gap(val_loss, record["reference_val_loss"])
    history.log(record, step)
    progress.validated(step, val_loss, gap)


def _check_world_size(state: PartialState) -> None:
    """Catch `accelerate launch --cpu` style launches that silently start independent single processes."""
    expected = int(os.environ.get("WORLD_SIZE", "1"))
    if state.num_processes != expected:
        raise ConfigError(
            f"launched {expected} processes but accelerate sees {state.num_processes}: check the launcher"
        )


def run(recipe: Recipe) -> UptrainingResult:
    """Train as the recipe says (resuming if its output_dir holds a checkpoint); return the exported folder with the
    record written there and the last training loss (`UptrainingResult`).

    Around the run: the process stops when its launcher is gone (launcher.py), the output folder is locked for
    this run alone (run_lock.py), a full disk anywhere ends in one line saying what to free (disk.py), and text
    that is not UTF-8, met at any step where the data is streamed, in one line naming the file.
    """
    watch_launcher()
    with ExitStack() as stack:  # closed in reverse: the progress bar, then the disk-full line, then the lock
        state = PartialState(cpu=not torch.cuda.is_available())
        # A folder that holds something else is refused before a lock file is put in it; what the folder holds
        # (fresh, resume, complete) is read again by _check, under the lock, where no other run can change it.
        check_output_dir(recipe)
        space = disk.Space(Path(recipe.output_dir), keep=recipe.checkpoint.keep)
        stack.enter_context(run_lock.hold(Path(recipe.output_dir), state))
        stack.enter_context(disk.explained(space))
        sources = [recipe.data.train, recipe.data.validation]
        stack.enter_context(naming_undecodable_files([source.path for source in sources if source is not None]))
        return _run(recipe, state, stack, space)


def _run(recipe: Recipe, state: PartialState, stack: ExitStack, space: disk.Space | None = None) -> UptrainingResult:
    """Checks, setup, then the step loop: an optimizer step, then, at the step boundaries `cadence.py` names, the
    divergence check, logging, evaluation and a checkpoint; at the end, the export."""
    models, budget, provenance, status = _check(recipe, state)
    if status == "complete":
        state.print(f"{recipe.output_dir} already holds the finished run ({Path(recipe.output_dir) / 'model'}): "
                    "nothing to do")
        return finished_run(Path(recipe.output_dir))
    run = _set_up(recipe, models, budget, status, stack, space)
    cadence = Cadence.of(recipe, budget.steps)
    while run.step < budget.steps:
        run.train_step()
        step = run.step
        if cadence.log(step) or cadence.validate(step) or cadence.save(step) or step == budget.steps:
            run.divergence.check(run.accelerator, run.checkpoints)  # before anything is logged, saved or exported
        if cadence.log(step):
            run.log()
        if cadence.validate(step):
            run.validate()
        if cadence.save(step):
            run.save()
    run.progress.close()

    result = _export(run.accelerator, recipe, models, budget, run.model, run.history.records(), provenance)
    run.accelerator.end_training()
    run.accelerator.print(f"uptrained model written to {result.model}")
    return result


def _check(recipe: Recipe, state: PartialState) -> tuple[Models, TrainingBudget, Provenance, str]:
    """Everything that can be wrong, checked before any work (the plan printed on the way); returns the models, the
    training budget, the source's provenance and what output_dir holds ('fresh', 'resume' or 'complete')."""
    models = check_models(recipe)
    check_trackers(recipe.log.trackers)
    _check_world_size(state)
    provenance = source_provenance(models.folder)
    original = models.teacher_config or original_config(models.config, provenance)
    budget = plan_budget(recipe.budget, recipe.batch, recipe.data.seq_len, state.num_processes, models.config, original)
    state.print(f"gqa-uptrain plan for {recipe.model.path} on {state.num_processes} process(es):\n{budget.describe()}")
    check_attention(recipe)
    status = check_output_dir(recipe)
    if status == "complete":
        check_model_unchanged(recipe, models.folder, finished=True)
    if status == "resume":
        check_model_unchanged(recipe, models.folder)
        check_data_unchanged(recipe)
    return models, budget, provenance, status


def _set_up(recipe: Recipe, models: Models, budget: TrainingBudget, status: str, stack: ExitStack,
            space: disk.Space | None) -> _Training:
    """Data, model, teacher, optimizer, schedule and loaders, prepared by accelerate; the run resumed from its latest
    checkpoint, or its curve started with a validation of the converted model (and of the teacher)."""
    set_seed(recipe.seed)
    accelerator = _accelerator(recipe, budget)
    with accelerator.main_process_first():
        train_rows, val_rows = data.build_datasets(
            recipe.data, models.tokenizer, recipe.seed, train_rows=budget.steps * recipe.batch.global_batch,
            val_rows=recipe.eval.batches * recipe.batch.micro_batch * accelerator.num_processes, say=accelerator.print,
            vocab_size=models.config.vocab_size,
        )
    if accelerator.is_main_process:
        write_snapshot(recipe)
        write_fingerprints(recipe, models.folder)

    frozen_dtype = _frozen_dtype(recipe, accelerator, models.config.dtype)
    model = _load_model(models.folder, recipe, frozen_dtype or torch.float32)
    learning = select_trainable(model, recipe.train.trainable, frozen_dtype)
    accelerator.print(learning.describe())
    if recipe.model.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if space is not None:  # a checkpoint holds the weights, and two fp32 AdamW moments of those that learn
        space.checkpoint_bytes = sum(p.numel() * p.element_size() for p in model.parameters()) + 8 * learning.trainable
    teacher = shared_teacher(accelerator, recipe, model, models) if recipe.teacher else None
    optimizer = build_optimizer(model, recipe.train)
    scheduler = build_schedule(optimizer, recipe.train, budget.steps)
    model, optimizer, train_loader, val_loader = accelerator.prepare(
        model,
        optimizer,
        data.train_loader(train_rows, recipe.batch.micro_batch),
        data.val_loader(val_rows, recipe.batch.micro_batch, recipe.eval.batches, accelerator.num_processes),
    )
    # The scheduler's state goes into the checkpoint's JSON (_Training.save), not through register_for_checkpointing:
    # accelerate unpickles registered objects with weights_only=False, so a planted file would run code on resume.
    if recipe.teacher and teacher is None:
        teacher = place_teacher(accelerator, recipe, models.teacher_folder)

    checkpoints = Path(recipe.output_dir) / "checkpoints"
    step, tokens, position = _resume(accelerator, checkpoints, status, budget.steps, scheduler)
    history = History(Path(recipe.output_dir) / "metrics.jsonl", accelerator)
    history.truncate(step if step else -1)  # a fresh start keeps no record, not even a step-0 validation
    batches = data.Batches(accelerator, train_loader, **position)
    accelerator.init_trackers(recipe.log.project, config=flat_config(recipe.model_dump(mode="json")))
    peak = peak_tflops(recipe.log.peak_tflops)
    progress = stack.enter_context(Progress(budget.steps, step, accelerator.is_main_process, peak))
    if step == 0:  # the curve starts at the converted model, and the teacher's loss (a resumed run has them already)
        _validate(accelerator, model, val_loader, history, step, tokens, progress, None, teacher)
    throughput = Throughput(budget.flops_per_token, peak, accelerator.num_processes)
    if peak is not None:
        accelerator.print(f"MFU is against {peak.description}")
    model.train()
    return _Training(recipe, budget, accelerator, model, teacher, optimizer, scheduler, batches, val_loader,
                     checkpoints, space, history, progress, throughput, Gap.of(history.records()),
                     LossWindow(accelerator.device), Divergence(accelerator.device), step, tokens)


@dataclass
class _Training:
    """What the step loop works on, and what it does: `train_step`, and at step boundaries `log`, `validate` and
    `save`. `step` and `tokens` count what has been trained."""

    recipe: Recipe
    budget: TrainingBudget
    accelerator: Accelerator
    model: torch.nn.Module
    teacher: torch.nn.Module | None
    optimizer: torch.optim.Optimizer
    scheduler: LambdaLR
    batches: data.Batches
    val_loader: Iterable
    checkpoints: Path
    space: disk.Space | None
    history: History
    progress: Progress
    throughput: Throughput
    gap: Gap | None  # the teacher's validation loss, which the curve closes towards
    losses: LossWindow
    divergence: Divergence  # checked before anything is logged, saved or exported
    step: int
    tokens: int
    grad_norm: Tensor | None = None

    def train_step(self) -> None:
        """One optimizer step: `grad_accum` micro-batches under `accelerator.accumulate`, gradient clipping, AdamW,
        a scheduler step."""
        accelerator, model = self.accelerator, self.model
        clip = self.recipe.train.grad_clip or float("inf")
        for _ in range(self.budget.grad_accum):
            input_ids = next(self.batches)["input_ids"]
            with accelerator.accumulate(model):
                objective, lm_loss, kd_loss = _forward(model, self.teacher, input_ids, self.recipe, accelerator)
                accelerator.backward(objective)
                if accelerator.sync_gradients:
                    self.grad_norm = accelerator.clip_grad_norm_(model.parameters(), clip)
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
            self.losses.add(lm_loss, kd_loss)
            self.divergence.add(objective, self.step + 1)
        self.scheduler.step()
        self.step += 1
        self.tokens += self.budget.tokens_per_step
        self.throughput.add(self.budget.tokens_per_step)
        self.progress.update()

    def log(self) -> None:
        """The losses since the last log, learning rate, throughput and memory, into metrics.jsonl and the trackers."""
        loss, kd_loss = self.losses.report(self.accelerator)
        record = {"loss": loss, "lr": self.scheduler.get_last_lr()[0], "tokens": self.tokens,
                  **self.throughput.report(), **peak_memory(self.accelerator.device)}
        if self.grad_norm is not None:
            record["grad_norm"] = float(self.grad_norm)
        if kd_loss is not None:
            record["kd_loss"] = kd_loss
        if self.budget.pretrain_tokens is not None:
            record["fraction_of_pretraining_compute"] = self.budget.fraction_of_pretraining_compute(self.tokens)
        self.history.log(record, self.step)
        self.progress.log(self.step, record)

    def validate(self) -> None:
        """The validation loss now (its time left out of the throughput)."""
        _validate(self.accelerator, self.model, self.val_loader, self.history, self.step, self.tokens, self.progress,
                  self.gap)
        self.throughput.restart()

    def save(self) -> None:
        """A checkpoint of the whole training state, with the data position and the schedule, once there is room."""
        state_record = {"step": self.step, "tokens": self.tokens, "data": self.batches.state(),
                        "scheduler": self.scheduler.state_dict()}
        if self.space is not None:
            disk.check_room(self.space, self.accelerator)
        started = time.perf_counter()
        saved = checkpoint.save_checkpoint(self.accelerator, self.checkpoints, state_record,
                                           self.recipe.checkpoint.keep)
        self.accelerator.print(f"checkpoint {saved.name}: {checkpoint.size_bytes(saved) / 1e9:.1f} GB "
                               f"in {time.perf_counter() - started:.1f} s")
        self.throughput.restart()


def reset_accelerate_state() -> None:
    """Forget accelerate's process-wide state, so that `run` can be called again in this process (tests, benchmarks).

    accelerate keeps it in singletons (`AcceleratorState`, `GradientState`) that a later Accelerator with other
    settings would inherit. accelerate (1.15) has no public way to clear them: `_reset_state` is what its own test
    base class calls, and it is called here and nowhere else, so an accelerate upgrade has one place to check.
    """
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def _resume(accelerator: Accelerator, checkpoints: Path, status: str, steps: int,
            scheduler: LambdaLR) -> tuple[int, int, dict[str, int]]:
    """(step, tokens, data position) to start from: the latest checkpoint's when resuming, else the beginning; the
    scheduler is put back where it was."""
    resuming = status == "resume"
    latest = checkpoint.resumable_checkpoint(checkpoints, accelerator.is_main_process) if resuming else None
    if latest is None:
        return 0, 0, {"epoch": 0, "batches": 0}
    started = time.perf_counter()
    saved = checkpoint.load_checkpoint(accelerator, latest)
    if not isinstance(saved.get("scheduler"), dict):
        raise CheckpointError(f"cannot resume from {latest}: its {checkpoint.STATE_FILE} holds no scheduler state")
    scheduler.load_state_dict(saved["scheduler"])
    accelerator.print(f"resumed from {latest} (step {saved['step']:,} of {steps:,}) "
                      f"in {time.perf_counter() - started:.1f} s")
    return saved["step"], saved["tokens"], saved["data"]


def _export(
    accelerator: Accelerator, recipe: Recipe, models: Models, budget: TrainingBudget, model: torch.nn.Module,
    records: list[dict], provenance: Provenance,
) -> UptrainingResult:
    """The trained model in the checkpoint's dtype with its uptraining record, and the loss curve beside it."""
    output = Path(recipe.output_dir)
    last_val = next((r["val_loss"] for r in reversed(records) if "val_loss" in r), None)
    uptraining = {
        "recipe": recipe.model_dump(mode="json"),
        "steps": budget.steps,
        "tokens": budget.tokens,
        "flops": budget.flops,
        "pretrain_tokens": budget.pretrain_tokens,
        "fraction_of_pretraining_tokens": budget.fraction_of_pretraining_tokens(),
        "fraction_of_pretraining_compute": budget.fraction_of_pretraining_compute(),
        "teacher": recipe.teacher.path if recipe.teacher else None,
        "world_size": accelerator.num_processes,
        "final_val_loss": last_val,
    }
    target = output / "model"
    written = export_model(
        accelerator, model, models.tokenizer, target, provenance, uptraining,
        dtype=models.config.dtype, use_cache=getattr(models.config, "use_cache", None),
    )
    if accelerator.is_main_process:
        plot_loss_curve(records, output / "loss_curve.png")
    return UptrainingResult.of(target, written, records)
