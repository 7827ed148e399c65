"""When the loop logs, evaluates and saves a checkpoint: every N optimizer steps, and always at the last step.

The loop asks after each optimizer step (`cadence.log(step)`, ...) and does the work itself; the rule lives here
once, so the three events cannot drift apart. A resumed run restarts at the step after its checkpoint and follows
the same cadence, since each event depends on the step number alone.
"""

from __future__ import annotations

from dataclasses import dataclass

from .recipe import Recipe


@dataclass(frozen=True)
class Cadence:
    steps: int  # the last optimizer step of the run
    log_every: int
    eval_every: int
    save_every: int

    @classmethod
    def of(cls, recipe: Recipe, steps: int) -> Cadence:
        return cls(steps, recipe.log.every, recipe.eval.every, recipe.checkpoint.every)

    def _due(self, step: int, every: int) -> bool:
        return step % every == 0 or step == self.steps

    def log(self, step: int) -> bool:
        """Whether to write a training record (loss, lr, throughput) after `step`."""
        return self._due(step, self.log_every)

    def validate(self, step: int) -> bool:
        """Whether to compute the validation loss after `step`."""
        return self._due(step, self.eval_every)

    def save(self, step: int) -> bool:
        """Whether to write a checkpoint after `step`."""
        return self._due(step, self.save_every)
