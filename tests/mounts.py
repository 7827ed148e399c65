"""A real full disk (or a read-only one) for the fault tests: a small tmpfs, which only root can mount."""

import os
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest


@contextmanager
def small_tmpfs(folder: Path, size: str, read_only: bool = False) -> Iterator[Path]:
    """A tmpfs of `size` (e.g. "80m") mounted at `folder` for the block, `read_only` if asked (root may write to any
    folder chmod'ed read-only, not to a read-only mount); the test is skipped, saying why, where it cannot be
    mounted."""
    folder.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a small tmpfs needs root")
    options = f"ro,size={size}" if read_only else f"size={size}"
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)], capture_output=True)
    if made.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {made.stderr.decode().strip()}")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False)
