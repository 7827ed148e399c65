"""Paths as users write them: `~` expanded, and an output folder refused in one line when it cannot be one."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TypeVar

from gqa_uptrain.errors import OutputError

P = TypeVar("P", str, Path)


def expand_home(path: P) -> P:
    """A path as the user wrote it, `~` at its start expanded as the shell would. Recipes, quoted arguments and
    `--flag=~/x` reach us unexpanded, and taken literally they make a folder named `~` in the working folder, one
    `rm -rf ~` away from a deleted home. Anything else (a Hub id, a relative path) is returned as it is."""
    if isinstance(path, (str, Path)) and str(path).startswith("~"):
        return type(path)(os.path.expanduser(path))
    return path


def check_output_folder(path: Path, what: str) -> None:
    """Refuse, in one OutputError line, an output folder that is not one and cannot become one: a file, a link to
    nothing, or a folder (where it does not exist yet, the nearest one above it) this process cannot write. A link
    to a folder is allowed: it is how users put an output on another disk. `what` names it, e.g. "output_dir"."""
    path = Path(path)
    if path.is_symlink() and not path.exists():
        raise OutputError(f"{what} {path} is a link to {os.readlink(path)}, which does not exist; create that "
                          f"folder, or remove the link or choose another {what}")
    existing = next(p for p in (path, *Path(os.path.abspath(path)).parents) if p.exists())
    if not existing.is_dir():
        where = "" if existing == path else f"{existing}, above it, "
        raise OutputError(f"{what} {path}: {where}is a file, not a folder; remove it or choose another {what}")
    if not os.access(existing, os.W_OK | os.X_OK):
        where = "" if existing == path else f" ({existing}, where it would be made)"
        raise OutputError(f"{what} {path} cannot be written{where}: no permission, or a read-only file system; "
                          f"choose another {what}")
