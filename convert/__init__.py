"""Convert a Hugging Face checkpoint to fewer KV heads (`gqa-convert`), one tensor at a time.

Where things happen: `source.py` finds the files, `layout.py` finds which tensors hold KV heads,
`plan.py` decides every output tensor, `pooling.py` pools one tensor with a method from `methods/`,
`checkpoint_io.py` reads and writes safetensors lazily, `converter.py` runs the plan atomically.
"""

from __future__ import annotations

from pathlib import Path

from gqa_uptrain.convert.converter import convert, default_output
from gqa_uptrain.convert.plan import build_plan
from gqa_uptrain.source import resolve_source


def convert_checkpoint(source: str | Path, groups: int, output: str | Path | None = None, *, method: str = "mean",
                       seed: int = 0, revision: str | None = None, max_shard_bytes: int = 5_000_000_000,
                       force: bool = False, progress: bool = True) -> Path:
    """Convert `source` (folder or Hub id) to `groups` KV heads; returns the output folder."""
    resolved = resolve_source(str(source), revision)
    plan = build_plan(resolved.folder, groups, method, seed, max_shard_bytes)
    target = Path(output) if output is not None else default_output(resolved.name, groups)
    return convert(plan, resolved, target, force=force, progress=progress)
