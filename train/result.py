"""What `uptrain` returns: the exported folder and what the run did, from the record it wrote and its history, so
that a caller reads them from the call instead of opening the files the call has just written."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gqa_uptrain.provenance import Provenance, read_provenance

from .history import read_records


@dataclass(frozen=True)
class UptrainingResult:
    """`model`: the exported folder (output_dir/model), loadable with `from_pretrained`. `provenance`: the record
    written there as gqa_provenance.json, whose `uptraining` section holds the run's steps, tokens, budget and
    recipe. `final_loss`: the last logged training loss (metrics.jsonl); None when no step was logged."""

    model: Path
    provenance: Provenance
    final_loss: float | None

    @classmethod
    def of(cls, model: Path, provenance: Provenance, records: list[dict[str, Any]]) -> UptrainingResult:
        """The result from the record written and the run's history (metrics.jsonl's records)."""
        return cls(model, provenance, next((r["loss"] for r in reversed(records) if "loss" in r), None))

    @property
    def steps(self) -> int:
        return self.provenance["uptraining"]["steps"]

    @property
    def tokens(self) -> int:
        return self.provenance["uptraining"]["tokens"]

    @property
    def final_val_loss(self) -> float | None:
        """The last validation loss (None when the run never validated)."""
        return self.provenance["uptraining"]["final_val_loss"]


def finished_run(output_dir: Path) -> UptrainingResult:
    """The result of a run an earlier call finished: what its folder holds."""
    history = output_dir / "metrics.jsonl"
    records = read_records(history)[0] if history.exists() else []
    return UptrainingResult.of(output_dir / "model", read_provenance(output_dir / "model"), records)
