"""How much of the conversion's loss gap training has won back, against the teacher's validation loss."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Gap:
    """What the conversion cost, and how much of it training has won back, in validation loss on the same batches.

    gap = start - reference, where start is the converted model's loss before any step and reference the teacher's
    (the original model, as recipes use it), measured once at step 0; recovered = (start - now) / gap. 100% means
    the teacher's loss is reached; above 100%, passed (the student also learns the data). Undefined (None) where
    the conversion cost nothing measurable (gap <= 0).
    """

    start: float
    reference: float

    @classmethod
    def of(cls, records: list[dict[str, Any]]) -> Gap | None:
        """From the step-0 record of metrics.jsonl; None when it holds no reference (a run without a teacher)."""
        first = next((r for r in records if r["step"] == 0 and "reference_val_loss" in r), None)
        return cls(first["val_loss"], first["reference_val_loss"]) if first else None

    def recovered(self, val_loss: float) -> float | None:
        gap = self.start - self.reference
        return (self.start - val_loss) / gap if gap > 0 else None

    def describe(self, val_loss: float) -> str:
        share = self.recovered(val_loss)
        if share is None:
            return (f"nothing, there is no gap: the start {self.start:.4f} is not above the teacher's "
                    f"{self.reference:.4f}")
        return f"{share:.1%} of the gap to the teacher's {self.reference:.4f} (start {self.start:.4f})"
