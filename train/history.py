"""metrics.jsonl, the run's history: one whole JSON line per logged step, torn lines dropped on resume."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from accelerate import Accelerator

from gqa_uptrain.atomic_write import write_atomically
from gqa_uptrain.cli import warn


class History:
    """metrics.jsonl in the output folder: every logged record, kept consistent with the resumed step.

    Append-safe: each record is one whole line written by one write (a failed write is undone), and a resume
    drops a torn or unreadable line (a crash or a full disk mid-write) with one warning instead of failing.
    """

    def __init__(self, path: Path, accelerator: Accelerator) -> None:
        self.path, self.accelerator = path, accelerator

    def truncate(self, step: int) -> None:
        """Forget records past `step` (written by a run that died after its last checkpoint) and unreadable lines."""
        if not self.accelerator.is_main_process or not self.path.exists():
            return
        records, unreadable = read_records(self.path)
        kept = [record for record in records if record["step"] <= step]
        if unreadable:
            warn("gqa-uptrain", f"{self.path}: dropped {unreadable} torn or unreadable line(s), left by a crash "
                 "or a full disk while it was written")
        whole = self.path.read_bytes().endswith(b"\n") or self.path.stat().st_size == 0
        if unreadable or len(kept) != len(records) or not whole:
            write_atomically(self.path, "".join(json.dumps(record) + "\n" for record in kept))

    def log(self, record: dict[str, Any], step: int) -> None:
        self.accelerator.log(record, step=step)
        if self.accelerator.is_main_process:
            append_line(self.path, json.dumps({"step": step, **record}))

    def records(self) -> list[dict[str, Any]]:
        return read_records(self.path)[0] if self.path.exists() else []


def append_line(path: Path, line: str) -> None:
    """Append `line` and a newline as one write; if it fails (a full disk), cut the file back to where it was."""
    data = (line + "\n").encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        start = os.fstat(fd).st_size
        try:
            written = 0
            while written < len(data):
                written += os.write(fd, data[written:])
        except OSError:
            os.ftruncate(fd, start)
            raise
    finally:
        os.close(fd)


def read_records(path: Path) -> tuple[list[dict[str, Any]], int]:
    """(the JSON records with a step, number of lines that are not one: torn, unparsable or without a step)."""
    records, unreadable = [], 0
    for line in path.read_bytes().split(b"\n"):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:  # a torn line, or bytes that are not UTF-8
            unreadable += 1
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), int):
            records.append(record)
        else:
            unreadable += 1
    return records, unreadable
