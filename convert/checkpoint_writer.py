"""Streaming writing of Hugging Face safetensors shards, one tensor at a time, as mergekit's io/tensor_writer does.

Output shards are laid out from a plan before any data is written (`assign_shards`), so each tensor is streamed to
its final offset the moment it is made and nothing is buffered: a tensor that passes through unchanged is copied
byte for byte from its source file (`copy_tensor`), a new one is written from memory (`write_tensor`). Shards are
named as transformers' save_pretrained names them, with the index written at the end. `checkpoint_reader.py` reads.
"""

from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Callable, Iterable

import torch

from gqa_uptrain.errors import CheckpointError

from .checkpoint_reader import SAFETENSORS_DTYPES, SAFETENSORS_INDEX, SAFETENSORS_SINGLE, CheckpointReader

SAFETENSORS_CODES = {dtype: name for name, dtype in SAFETENSORS_DTYPES.items()}
COPY_CHUNK = 64 << 20


def copy_tensor(reader: CheckpointReader, name: str, out: BinaryIO, progress: Callable[[int], None]) -> None:
    """Append a source tensor's bytes to `out` unchanged, without decoding it (kernel copy where possible)."""
    info = reader.tensors[name]
    if info.offset is None:
        write_tensor(out, reader.read(name), progress)
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
