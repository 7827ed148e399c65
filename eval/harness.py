"""lm-evaluation-harness, run on an already-loaded model with settings that are identical for every model.

lm-eval's defaults drift between versions, so every setting that can change a score is passed explicitly
and recorded (it is part of the cache key and of the report).
"""

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from importlib.metadata import PackageNotFoundError, version

import torch
from transformers import PreTrainedTokenizerBase

from gqa_uptrain.errors import DataError, EvaluationError, one_line

from .local_tasks import TaskSelection


@dataclass(frozen=True)
class HarnessSettings:
    num_fewshot: int
    batch_size: int
    limit: int | float | None
    seed: int
    dtype: str
    add_bos_token: bool  # decided once, from the base tokenizer; see the BOS pitfall in docs
    bootstrap_iters: int

    def as_dict(self) -> dict:
        return {**asdict(self), "lm_eval": _lm_eval_version()}


def _lm_eval_version() -> str | None:
    """lm-eval is imported only when a task runs, so perplexity and speed work where it is not installed."""
    try:
        return version("lm-eval")
    except PackageNotFoundError:
        return None


def check_task_loads(selection: TaskSelection, name: str) -> None:
    """Build the task (which reads or downloads its data) so a missing dataset fails before any model runs."""
    try:
        selection.manager.load([name])
    except Exception as error:  # noqa: BLE001 - datasets raises many kinds; all mean the data is unusable
        reason = one_line(error)
        raise DataError(
            f"task '{name}': its data does not load ({reason}); offline, use a local task (see gqa-eval --help)"
        ) from error


@contextmanager
def no_git_hash() -> Iterator[None]:
    """lm-eval without its `git describe`: it records the git commit of the working directory in every result by
    running git with the terminal as stderr, so outside a repository each task printed `fatal: not a git
    repository`. The hash is not kept here (the report records lm-eval's version), so it is simply not asked for."""
    import lm_eval.evaluator as evaluator

    original = getattr(evaluator, "get_git_commit_hash", None)
    if original is None:  # a later lm-eval without it
        yield
        return
    evaluator.get_git_commit_hash = lambda: None
    try:
        yield
    finally:
        evaluator.get_git_commit_hash = original


def evaluate_task(
    model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, name: str, selection: TaskSelection,
    settings: HarnessSettings,
) -> dict:
    """One lm-eval task (or group) on one model; returns lm-eval's per-task results and metric directions."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=settings.batch_size,
              add_bos_token=settings.add_bos_token)
    seed = settings.seed
    try:
        with no_git_hash():
            output = lm_eval.simple_evaluate(
                model=lm, tasks=[name], task_manager=selection.manager, num_fewshot=settings.num_fewshot,
                limit=settings.limit, bootstrap_iters=settings.bootstrap_iters, log_samples=False,
                random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed, fewshot_random_seed=seed,
            )
    except AssertionError as error:  # lm-eval asserts that every continuation fits the model's context
        raise EvaluationError(f"task '{name}': an item does not fit the model's context of {lm.max_length} "
                              "tokens (lm-eval cannot score it)") from error
    return {key: output[key] for key in ("results", "higher_is_better", "n-samples", "versions", "group_subtasks")}
