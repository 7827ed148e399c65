"""Convert a Hugging Face checkpoint to fewer KV heads (`gqa-convert`), one tensor at a time.

Where things happen: `gqa_uptrain.source` finds the files, `layout.py` finds which tensors hold KV heads (on a
model built on the meta device, `gqa_uptrain.kv_heads`), `plan.py` decides every output tensor (`ConversionPlan`),
`pooling.py` pools one tensor with a method from `methods/` (`METHODS` is the one list of them),
`checkpoint_io.py` reads and writes safetensors lazily, `converter.py` runs the plan atomically, and `card.py`
writes the model card from the provenance record (`gqa_uptrain.provenance`).
"""

from __future__ import annotations

from pathlib import Path

from gqa_uptrain.convert.converter import convert, default_output
from gqa_uptrain.convert.plan import CalibrationOptions, build_plan
from gqa_uptrain.source import resolve_source


def convert_checkpoint(source: str | Path, groups: int, output: str | Path | None = None, *, method: str = "mean",
                       seed: int = 0, revision: str | None = None, max_shard_bytes: int = 5_000_000_000,
                       force: bool = False, progress: bool = True, calibration: str | None = None,
                       calibration_tokens: int = 32_768) -> Path:
    """Convert `source` (folder or Hub id) to `groups` KV heads; returns the output folder.

    `calibration` and `calibration_tokens` are the calibrated method's text (None: the default) and its size.
    """
    resolved = resolve_source(str(source), revision)
    plan = build_plan(resolved.folder, groups, method, seed, max_shard_bytes,
                      CalibrationOptions(calibration, calibration_tokens))
    target = Path(output) if output is not None else default_output(resolved.name, groups)
    return convert(plan, resolved, target, force=force, progress=progress)
