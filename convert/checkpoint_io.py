"""Lazy reading and streaming writing of Hugging Face checkpoints, one tensor at a time.

The converter must run a 70B checkpoint on a 24 GB machine, so nothing here holds more than one tensor:
safetensors tensors are read with positioned reads straight from the file (no mmap that would pile up
resident pages), tensors that pass through unchanged are copied byte for byte between files, and output
shards are laid out from a plan before any data is written, so each tensor is streamed to its final offset
the moment it is made.
"""

from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import BinaryIO, Callable, Collection, Iterable

import torch

from gqa_uptrain.errors import CheckpointError
from gqa_uptrain.model_folder import require_inside
from gqa_uptrain.provenance import PROVENANCE

SAFETENSORS_INDEX = "model.safetensors.index.json"
SAFETENSORS_SINGLE = "model.safetensors"
BIN_INDEX = "pytorch_model.bin.index.json"
BIN_SINGLE = "pytorch_model.bin"

# The dtype codes of a safetensors header and the torch dtypes they stand for, both ways.
SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
SAFETENSORS_CODES = {dtype: name for name, dtype in SAFETENSORS_DTYPES.items()}
COPY_CHUNK = 64 << 20


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

    def copy_raw(self, name: str, out: BinaryIO, progress: Callable[[int], None]) -> None:
        """Append a tensor's bytes to `out` unchanged, without decoding it (kernel copy where possible)."""
        info = self.tensors[name]
        if info.offset is None:
            write_tensor(out, self.read(name), progress)
            return
        with open(info.file, "rb") as src:
            done = 0
            while done < info.nbytes:
                count = min(COPY_CHUNK, info.nbytes - done)
                copied = _copy_range(src, info.offset + done, out, count)
                if copied == 0:
                    raise CheckpointError(f"{info.file}: ended early while reading tensor {name}")
                done += copied
                progress(copied)


def write_tensor(out: BinaryIO, tensor: torch.Tensor, progress: Callable[[int], None]) -> None:
    """Append a tensor's raw little-endian bytes to `out`."""
    data = tensor.detach().contiguous().reshape(-1).view(torch.uint8).numpy()
    out.write(memoryview(data))
    progress(data.nbytes)


@dataclass(frozen=True)
class OutputTensor:
    """A tensor the writer will receive: its name, dtype and shape are fixed before any data is written."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def assign_shards(tensors: list[OutputTensor], max_shard_bytes: int) -> list[list[OutputTensor]]:
    """Split tensors, in order, into shards of at most `max_shard_bytes` (a larger tensor gets its own)."""
    shards: list[list[OutputTensor]] = [[]]
    size = 0
    for tensor in tensors:
        if shards[-1] and size + tensor.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(tensor)
        size += tensor.nbytes
    return shards


def shard_names(count: int) -> list[str]:
    """The file names transformers' save_pretrained gives to `count` safetensors shards."""
    if count == 1:
        return [SAFETENSORS_SINGLE]
    return [f"model-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)]


class ShardedWriter:
    """Writes planned shards in order; each tensor goes straight to its offset, nothing is buffered."""

    def __init__(self, folder: Path, shards: list[list[OutputTensor]], progress: Callable[[int], None]):
        self.folder = folder
        self.shards = shards
        self.names = shard_names(len(shards))
        self.progress = progress
        self._queue = [(i, t) for i, shard in enumerate(shards) for t in shard]
        self._next = 0
        self._file: BinaryIO | None = None
        self._shard = -1

    def __enter__(self) -> "ShardedWriter":
        return self

    def __exit__(self, *exc) -> None:
        if self._file is not None:
            self._file.close()

    def expect(self) -> OutputTensor:
        """The tensor the writer needs next."""
        return self._queue[self._next][1]

    def write(self, source: Callable[[BinaryIO, Callable[[int], None]], None]) -> None:
        """Let `source` append the next tensor's bytes, then check that it wrote exactly that many."""
        shard, tensor = self._queue[self._next]
        if shard != self._shard:
            self._open(shard)
        start = self._file.tell()
        source(self._file, self.progress)
        if self._file.tell() - start != tensor.nbytes:
            raise RuntimeError(f"tensor {tensor.name}: wrote {self._file.tell() - start} bytes, "
                               f"planned {tensor.nbytes}")
        self._next += 1

    def _open(self, shard: int) -> None:
        if self._file is not None:
            self._file.close()
        self._shard = shard
        self._file = open(self.folder / self.names[shard], "wb")
        self._file.write(_header_bytes(self.shards[shard]))

    def finish(self) -> None:
        """Close the last shard and write the index that maps each tensor to its shard."""
        if self._next != len(self._queue):
            raise RuntimeError(f"writer closed after {self._next} of {len(self._queue)} tensors")
        self._file.close()
        self._file = None
        if len(self.shards) > 1:
            index = {
                "metadata": {"total_size": sum(t.nbytes for s in self.shards for t in s)},
                "weight_map": {t.name: self.names[i] for i, s in enumerate(self.shards) for t in s},
            }
            (self.folder / SAFETENSORS_INDEX).write_text(json.dumps(index, indent=2) + "\n")


def _header_bytes(tensors: Iterable[OutputTensor]) -> bytes:
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for t in tensors:
        header[t.name] = {"dtype": SAFETENSORS_CODES[t.dtype], "shape": list(t.shape),
                          "data_offsets": [offset, offset + t.nbytes]}
        offset += t.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # align the data section as the safetensors library does
    return struct.pack("<Q", len(raw)) + raw


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


def _copy_range(src: BinaryIO, offset: int, out: BinaryIO, count: int) -> int:
    """Copy `count` bytes at `offset` of `src` to the end of `out`; returns how many were copied."""
    out.flush()
    try:
        copied = os.copy_file_range(src.fileno(), out.fileno(), count, offset)
        out.seek(0, os.SEEK_END)
        return copied
    except OSError:  # file systems that cannot copy ranges in the kernel
        src.seek(offset)
        data = src.read(count)
        out.write(data)
        return len(data)
