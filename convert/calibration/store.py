"""The finished layers of a calibrated conversion, kept on disk so that an interrupted run resumes at the next layer.

Where: `.NAME.calibration/` beside the output, not inside the `.NAME.partial-*` folder, which any failure removes.
The output's lock (`.NAME.lock`) guards it as it guards the output: one run writes it at a time. A failure or
Ctrl-C leaves it; the converter removes it once the converted model is in place, and `calibrate.py` when a NaN stops
the fit (the same inputs would stop there again).

What is in it:
- `identity.json`: everything that decides the fit (calibration tokens, seed, refinement steps, groups, the source's
  config and weight files, the package version). A run whose identity differs starts over, the store emptied.
- per finished layer i, `layer-i.safetensors` (its fitted tensors, as the output stores them: the writer streams them
  from here) and then `layer-i.json` (its report, and the tensor file's size). Each is written atomically and fsynced,
  the report last: a layer whose report is there and whose tensor file has the size the report says is finished.
- `model.safetensors.index.json`, written once every layer is finished, makes the folder a checkpoint to read from.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save

from gqa_uptrain.atomic_write import flush_to_disk, write_atomically
from gqa_uptrain.convert.checkpoint_reader import SAFETENSORS_INDEX, CheckpointReader

IDENTITY = "identity.json"


def store_path(output: Path) -> Path:
    """The store of an output: `.NAME.calibration` beside it."""
    return output.with_name(f".{output.name}.calibration")


class LayerStore:
    """A folder of finished layers (see the module docstring); `reports` holds those of layers 0, 1, ... in order."""

    def __init__(self, folder: Path, reports: list[dict], files: dict[str, str]):
        self.folder = folder
        self.reports = reports
        self._files = files  # tensor name -> file, for the index

    @classmethod
    def open(cls, folder: Path, identity: dict, layers: int) -> tuple[LayerStore, str | None]:
        """The store for a fit of `identity` over `layers` decoder layers: the finished layers of an earlier run with
        the same identity are kept, anything else is removed. Also returns why an earlier run's store was not
        reused (None when there was none, or it was)."""
        identity = json.loads(json.dumps(identity, sort_keys=True, default=str))  # as it reads back from disk
        earlier = _read_json(folder / IDENTITY)
        why = None
        if earlier != identity:
            if folder.exists():
                why = _difference(earlier, identity)
                shutil.rmtree(folder)
            write_atomically(folder / IDENTITY, json.dumps(identity, indent=1, sort_keys=True) + "\n")
            flush_to_disk([folder / IDENTITY])
        store = cls(folder, [], {})
        for i in range(layers):
            if not store._finished(i):
                break
        return store, why

    def _finished(self, i: int) -> bool:
        """Take in layer i if an earlier run finished it: its report is whole and its tensors are all there."""
        entry = _read_json(self.folder / f"layer-{i}.json")
        file = self.folder / f"layer-{i}.safetensors"
        if not isinstance(entry, dict) or not file.is_file() or file.stat().st_size != entry.get("bytes"):
            return False
        self.reports.append(entry["report"])
        self._files.update(dict.fromkeys(entry["tensors"], file.name))
        return True

    def save(self, i: int, tensors: dict[str, torch.Tensor], report: dict) -> None:
        """Keep finished layer i (the next one): its tensors (as they will be written), then its report, each
        fsynced."""
        assert i == len(self.reports), (i, len(self.reports))
        data = save(tensors)
        file = self.folder / f"layer-{i}.safetensors"
        write_atomically(file, data)
        flush_to_disk([file])
        entry = {"report": report, "bytes": len(data), "tensors": sorted(tensors)}
        write_atomically(self.folder / f"layer-{i}.json", json.dumps(entry) + "\n")
        flush_to_disk([self.folder / f"layer-{i}.json"])
        self.reports.append(report)
        self._files.update(dict.fromkeys(tensors, file.name))

    def load(self, i: int) -> dict[str, torch.Tensor]:
        """Finished layer i's tensors, as saved."""
        return load_file(self.folder / f"layer-{i}.safetensors")

    def remove(self) -> None:
        """Nothing here is worth resuming from."""
        shutil.rmtree(self.folder, ignore_errors=True)

    def reader(self) -> CheckpointReader:
        """Every layer finished: the folder as a checkpoint of the fitted tensors, for the writer to stream."""
        write_atomically(self.folder / SAFETENSORS_INDEX, json.dumps({"metadata": {}, "weight_map": self._files}))
        return CheckpointReader(self.folder)


def _read_json(path: Path) -> object:
    """A JSON file's value; None when it is missing or not whole (a crash while it was written)."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


_WHAT = {"calibration": "calibration text", "seed": "seed", "refine_steps": "--refine-steps", "groups": "--groups",
         "source_config": "source config", "source_files": "source weights", "version": "gqa-uptrain version"}


def _difference(earlier: object, identity: dict) -> str:
    """What changed since the earlier run, in words: "a different seed and calibration text"."""
    if not isinstance(earlier, dict):
        return "an unreadable record"
    changed = [_WHAT.get(key, key) for key in sorted(identity) if earlier.get(key) != identity[key]]
    return "a different " + " and ".join(changed) if changed else "a different record"
