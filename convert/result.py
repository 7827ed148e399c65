"""What `convert_checkpoint` returns: the folder and what the conversion did, so that a caller reads it from the
call instead of opening the files the call has just written."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from gqa_uptrain.provenance import Provenance


@dataclass(frozen=True)
class ConversionResult:
    """`output`: the model folder written, or the one a dry run would write. `provenance`: the record written
    beside the model as gqa_provenance.json (its `conversion` section says what was pooled or fitted, how, and for
    `calibrated` the fit of every layer); None for a dry run, which writes nothing."""

    output: Path
    method: str
    kv_heads_before: int
    kv_heads_after: int
    provenance: Provenance | None

    @property
    def dry_run(self) -> bool:
        return self.provenance is None
