"""Lazy reading of Hugging Face checkpoints, one tensor at a time, and which files make a model.

The converter must run a 70B checkpoint on a 24 GB machine, so nothing here holds more than one tensor:
safetensors tensors are read with positioned reads straight from the file (no mmap that would pile up
resident pages), after every header and index has been checked (a tensor outside its file, an index and shards
that disagree, a shard named outside the folder are one CheckpointError). `checkpoint_writer.py` writes.
"""

from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import BinaryIO, Collection

import torch

from gqa_uptrain.errors import CheckpointError
from gqa_uptrain.model_folder import require_inside
from gqa_uptrain.provenance import PROVENANCE

SAFETENSORS_INDEX = "model.safetensors.index.json"
SAFETENSORS_SINGLE = "model.safetensors"
BIN_INDEX = "pytorch_model.bin.index.json"
BIN_SINGLE = "pytorch_model.bin"

# The dtype codes of a safetensors header and the torch dtypes they stand for (the writer inverts it).
SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}


@dataclass(frozen=True)
class TensorInfo:
    """Where a source tensor lives and what it is, known without reading its data."""

    name: str
    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int | None = None  # absolute byte offset in a safetensors file; None for .bin files

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def read_safetensors_header(path: Path) -> dict[str, TensorInfo]:
    """Parse a safetensors header and check that every tensor lies inside the file."""
    size = _file_size(path)
    with open(path, "rb") as f:
        raw_len = f.read(8)
        if len(raw_len) < 8:
            raise CheckpointError(f"{path}: truncated safetensors file ({size} bytes)")
        (header_len,) = struct.unpack("<Q", raw_len)
        if header_len > size - 8:
            raise CheckpointError(f"{path}: corrupt safetensors header (claims {header_len} bytes)")
        try:
            header = json.loads(f.read(header_len))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{path}: corrupt safetensors header ({e})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: corrupt safetensors header (not a JSON object)")
    return header_tensors(path, header, 8 + header_len, size)


def header_tensors(path: Path, header: dict, data_start: int, size: int | None) -> dict[str, TensorInfo]:
    """The tensors a parsed safetensors header lists, each checked. `size` None: the file is not here (a Hub model's
    header, read by range requests), so only the entries themselves are checked, and offsets counted from the data
    section (`data_start` 0) still give the tensors' order."""
    infos = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        begin, end, shape = _header_entry(path, name, entry)
        dtype = SAFETENSORS_DTYPES.get(entry["dtype"])
        if dtype is None:
            raise CheckpointError(f"{path}: tensor {name} has unsupported dtype {entry['dtype']}")
        info = TensorInfo(name, path, dtype, shape, data_start + begin)
        if end - begin != info.nbytes or (size is not None and data_start + end > size):
            raise CheckpointError(f"{path}: tensor {name} lies outside the file (truncated or corrupt)")
        infos[name] = info
    return infos


def _is_count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _header_entry(path: Path, name: str, entry) -> tuple[int, int, tuple[int, ...]]:
    """(begin, end, shape) of one header entry, checked: valid JSON can still be a malformed header."""
    offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
    shape = entry.get("shape") if isinstance(entry, dict) else None
    if (not isinstance(offsets, list) or len(offsets) != 2 or not all(map(_is_count, offsets))
            or offsets[0] > offsets[1] or not isinstance(shape, list) or not all(map(_is_count, shape))
            or not isinstance(entry.get("dtype"), str)):
        raise CheckpointError(f"{path}: corrupt safetensors header (tensor {name} needs a dtype string, a shape "
                              "of whole numbers and two data_offsets)")
    return offsets[0], offsets[1], tuple(shape)


def stored_name(name: str, tensors: Collection[str]) -> str | None:
    """The checkpoint's name for a model parameter, or None when it has none: checkpoints of a bare base model
    store its parameters without the head's prefix (`layers.0...` for `model.layers.0...`)."""
    for candidate in (name, name.split(".", 1)[-1]):
        if candidate in tensors:
            return candidate
    return None


def check_index(index: Path, weight_map: dict[str, str], held: dict[str, Collection[str]]) -> None:
    """Refuse a sharded checkpoint whose index and shards disagree, tensor for tensor: the index names a tensor its
    shard does not hold, or a shard holds a tensor the index does not name there (unnamed, or named in another
    shard: a duplicate). `held`: each shard the index names (as the index spells it) -> the tensors its header
    lists. Local folders and Hub headers (`hub_headers`) are checked alike."""
    held_sets = {file: set(names) for file, names in held.items()}
    for name, file in weight_map.items():
        if name not in held_sets[file]:
            raise CheckpointError(f"{index}: names tensor {name}, which is not in {file}")
    for file, names in held.items():
        for name in names:
            if name not in weight_map:
                raise CheckpointError(f"{index}: does not name tensor {name}, which {file} holds")
            if weight_map[name] != file:
                raise CheckpointError(f"{index}: names tensor {name} in {weight_map[name]}, but {file} holds it "
                                      "too")


class CheckpointReader:
    """The tensors of a checkpoint folder (safetensors or .bin, single or sharded), read on demand."""

    def __init__(self, folder: Path, headers: dict[str, TensorInfo] | None = None):
        """`headers`: the tensors, known already (a Hub model's headers, to plan from): nothing is scanned, and as
        their files are not here, nothing can be read."""
        self.folder = folder
        self._bin_cache: tuple[Path, dict[str, torch.Tensor]] | None = None
        if headers is not None:
            self.tensors = headers
            self.files = list(dict.fromkeys(info.file for info in headers.values()))
            return
        self.files = _weight_files(folder)
        self.tensors: dict[str, TensorInfo] = {}
        held: dict[Path, list[str]] = {}
        for file in self.files:
            scanned = self._scan(file)
            held[file] = list(scanned)
            self.tensors.update(scanned)
        index = _index_path(folder)
        if index is not None:
            weight_map = read_weight_map(index)
            check_index(index, weight_map, {shard: held[_shard_path(folder, index, shard)]
                                            for shard in weight_map.values()})

    def _scan(self, file: Path) -> dict[str, TensorInfo]:
        if file.suffix == ".safetensors":
            return read_safetensors_header(file)
        state = self._load_bin(file)
        return {name: TensorInfo(name, file, t.dtype, tuple(t.shape)) for name, t in state.items()}

    def _load_bin(self, file: Path) -> dict[str, torch.Tensor]:
        """Memory-map a .bin file (one at a time) so its tensors are paged in only when touched."""
        if self._bin_cache is None or self._bin_cache[0] != file:
            self._bin_cache = None
            try:
                state = torch.load(file, map_location="cpu", mmap=True, weights_only=True)
            except Exception as e:  # torch raises many types for a damaged pickle or zip
                raise CheckpointError(f"{file}: cannot be read as a PyTorch checkpoint ({e})") from None
            self._bin_cache = (file, state)
        return self._bin_cache[1]

    def read(self, name: str) -> torch.Tensor:
        """One tensor, in its stored dtype, owning its memory."""
        info = self.tensors[name]
        if info.offset is None:
            return self._load_bin(info.file)[name].clone()
        buffer = torch.empty(info.nbytes, dtype=torch.uint8)
        with open(info.file, "rb") as f:
            _read_exactly(f, info.offset, memoryview(buffer.numpy()), info.file)
        return buffer.view(info.dtype).reshape(info.shape)


def _weight_files(folder: Path) -> list[Path]:
    """The checkpoint's weight files, from its index when there is one (safetensors preferred)."""
    index = _index_path(folder)
    if index is not None:
        weight_map = read_weight_map(index)
        files = [_shard_path(folder, index, name) for name in dict.fromkeys(weight_map.values())]
        for file in files:
            if not os.path.lexists(file):
                raise CheckpointError(f"{file}: shard named in {index.name} is missing")
            require_inside(folder, file)
        return files
    for single in (SAFETENSORS_SINGLE, BIN_SINGLE):
        if os.path.lexists(folder / single):
            require_inside(folder, folder / single)
            return [folder / single]
    raise CheckpointError(f"{folder}: no model weights found (expected {SAFETENSORS_SINGLE} or {BIN_SINGLE}, "
                          "or a sharded index)")


def read_weight_map(index: Path) -> dict[str, object]:
    """The index's map from tensor name to shard file; CheckpointError when the file is not JSON or its
    `weight_map` is missing or not a mapping (a list, say). The shard names are `_shard_path`'s to check."""
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise CheckpointError(f"{index}: not a valid checkpoint index ({e})") from None
    if not isinstance(weight_map, dict):
        raise CheckpointError(f"{index}: not a valid checkpoint index (its weight_map is a "
                              f"{type(weight_map).__name__}, not a mapping of tensor names to shard files)")
    return weight_map


def _shard_path(folder: Path, index: Path, name: object) -> Path:
    """A file the index names: a plain relative path that stays in the folder, neither absolute nor through `..`."""
    parts = PurePosixPath(name).parts if isinstance(name, str) else ()
    if not parts or parts[0] == "/" or ".." in parts or "\\" in name:
        raise CheckpointError(f"{index}: names the shard {name!r}, which is not a file inside the model folder")
    return folder.joinpath(*parts)


def _index_path(folder: Path) -> Path | None:
    for name in (SAFETENSORS_INDEX, BIN_INDEX):
        if os.path.lexists(folder / name):
            require_inside(folder, folder / name)
            return folder / name
    return None


def is_weight_file(path: Path) -> bool:
    """Weights and their indexes, which the converter rewrites instead of copying."""
    name = path.name
    return (path.suffix in {".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf", ".onnx"}
            or name in {SAFETENSORS_INDEX, BIN_INDEX})


def is_model_file(relative: str) -> bool:
    """What a model is (weights, their index, its config and provenance record): a folder whose copy of one of these
    links out of it is refused, where any other such file is only left out (gqa_uptrain.model_folder)."""
    return is_weight_file(Path(relative)) or relative in {"config.json", PROVENANCE}


def _file_size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError as e:
        raise CheckpointError(f"{path}: cannot be read ({e.strerror})") from None


def _read_exactly(f: BinaryIO, offset: int, view: memoryview, path: Path) -> None:
    f.seek(offset)
    done = 0
    while done < len(view):
        n = f.readinto(view[done:])
        if not n:
            raise CheckpointError(f"{path}: ended early (truncated file)")
        done += n
