"""The provenance record every model folder of this project carries beside its config: its schema, and the only
functions that build, read and write it.

gqa-convert writes it (the source files' hashes, the conversion), gqa-uptrain extends it (`uptraining`), the
scratch models of the demo and the reproduction are given a `pretraining` section, and gqa-eval and gqa-publish read
it; a model converted again keeps its previous record as `parent`. On disk it is `gqa_provenance.json`, plain JSON
with exactly the keys below. Records are kept as dicts (the types only name the keys): keys a reader does not know,
such as those of a record written by another tool, are carried forward untouched.
"""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, TypedDict

from gqa_uptrain import __version__
from gqa_uptrain.atomic_write import write_atomically

PROVENANCE = "gqa_provenance.json"
TOOL_NAME = "gqa-uptrain"


class Tool(TypedDict, total=False):
    name: str
    version: str


class SourceRecord(TypedDict, total=False):
    id: str  # a Hub id, or the absolute path of a local folder
    revision: str | None  # the Hub commit
    license: str | None  # from the source's model card
    sha256: dict[str, str]  # weight file name -> SHA-256 of its bytes


class Conversion(TypedDict, total=False):
    method: str  # a name in gqa_uptrain.convert.methods.METHODS
    groups: int
    kv_heads_before: int
    kv_heads_after: int
    query_heads: int
    seed: int  # random initialisation and calibration
    calibration: dict  # calibrated only: data, tokens, sequence_length, sha256 of the token ids, and per layer
    # the groups of original KV heads that share a new one, whether o_proj was refitted, held-out error


class Uptraining(TypedDict, total=False):
    recipe: dict[str, Any]  # the training recipe, as validated
    steps: int
    tokens: int
    flops: float
    pretrain_tokens: float | None
    fraction_of_pretraining_tokens: float | None
    fraction_of_pretraining_compute: float | None
    teacher: str | None
    world_size: int
    final_val_loss: float | None
    finished_at: str  # ISO 8601, UTC
    gqa_uptrain_version: str


class Pretraining(TypedDict, total=False):
    tokens: int  # the 100% that uptraining fractions refer to
    steps: int
    data: str


class Provenance(TypedDict, total=False):
    tool: Tool
    created: str  # ISO 8601, UTC; set by a conversion
    source: SourceRecord
    conversion: Conversion
    parent: Provenance  # the source's own record, when the source was itself converted
    uptraining: Uptraining
    pretraining: Pretraining


def _tool() -> Tool:
    return {"name": TOOL_NAME, "version": __version__}


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def conversion_record(source: SourceRecord, conversion: Conversion, parent: Provenance | None) -> Provenance:
    """The record of a model gqa-convert just made from `source` (whose own record, if any, is `parent`)."""
    record: Provenance = {"tool": _tool(), "created": _now(), "source": source, "conversion": conversion}
    if parent is not None:
        record["parent"] = parent
    return record


def unconverted_record(source_id: str) -> Provenance:
    """A record for a model gqa-convert never saw: only what it is."""
    return {"tool": _tool(), "source": {"id": source_id}}


def with_uptraining(record: Provenance, uptraining: Uptraining) -> Provenance:
    """`record` with its `uptraining` section (stamped with the time and version) set."""
    return {**record, "uptraining": {**uptraining, "finished_at": _now(), "gqa_uptrain_version": __version__}}


def pretraining_record(source_id: str, tokens: int, steps: int, data: str) -> Provenance:
    """The record of a model pretrained from scratch by this project: its tokens are the 100% of pretraining."""
    return {"tool": _tool(), "source": {"id": source_id},
            "pretraining": {"tokens": tokens, "steps": steps, "data": data}}


def base_record(record: Provenance) -> Provenance:
    """The first conversion in a chain of them: its source is the original model."""
    while "conversion" in record.get("parent", {}):
        record = record["parent"]
    return record


def kv_heads_before(record: Provenance | None) -> int | None:
    """The KV heads of the model the latest conversion started from; None when there was no conversion."""
    return ((record or {}).get("conversion") or {}).get("kv_heads_before")


def read_provenance(folder: Path) -> Provenance | None:
    """The folder's record, or None when it has none."""
    path = Path(folder) / PROVENANCE
    return json.loads(path.read_text()) if path.is_file() else None


def why_not_converted_here(folder: Path) -> str | None:
    """Why `folder` is not a model folder that gqa-convert (or gqa-uptrain after it) wrote, or None when it is one.

    Only such a folder may ever be replaced (gqa-convert --force): its own record, a regular file, says this tool
    made it by a conversion. A folder of anything else, a model pretrained by the demo included, is not.
    """
    path = Path(folder) / PROVENANCE
    if path.is_symlink() or not path.is_file():
        return f"it has no {PROVENANCE} of its own"
    try:
        record = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return f"its {PROVENANCE} is not valid JSON"
    tool = record.get("tool") if isinstance(record, dict) else None
    if not isinstance(tool, dict) or tool.get("name") != TOOL_NAME or "conversion" not in record:
        return f"its {PROVENANCE} records no conversion by {TOOL_NAME}"
    return None


def write_provenance(folder: Path, record: Provenance) -> None:
    """Write (or replace, atomically) the folder's record."""
    write_atomically(Path(folder) / PROVENANCE, json.dumps(record, indent=2) + "\n")
