"""The provenance record every model folder of this project carries beside its config.

gqa-convert writes it (source files' hashes, the conversion), gqa-uptrain extends it (`uptraining`), gqa-eval and
gqa-publish read it; a model converted again keeps its previous record as `parent`.
"""

from __future__ import annotations

import json
from pathlib import Path

PROVENANCE = "gqa_provenance.json"


def read_provenance(folder: Path) -> dict | None:
    """The folder's record, or None when it has none."""
    path = Path(folder) / PROVENANCE
    return json.loads(path.read_text()) if path.is_file() else None
