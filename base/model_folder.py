"""Which files of a model folder may be read: a link is followed only while it stays inside the model.

The rule, for every command that reads a model folder to copy, upload or load it: a file is read only when it is a
regular file (or a link to one) whose real path lies inside the model's root. The root is the folder itself, or,
for a snapshot in the Hugging Face cache (`models--<owner>--<name>/snapshots/<revision>`), the repository's cache
folder `models--<owner>--<name>`, where the snapshot's links into `blobs/` lead. Links to folders are never
followed, and hidden files and folders are left out. What a file that breaks the rule means depends on it: the
weights, their index, the config and the provenance record are what a model is, so a command refuses the folder
(CheckpointError); any other file is left out with one warning line.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from gqa_uptrain.cli import warn
from gqa_uptrain.errors import CheckpointError


def model_root(folder: Path) -> Path:
    """The real folder that the model's files, links resolved, must lie in."""
    folder = Path(folder).resolve()
    if folder.parent.name == "snapshots" and folder.parent.parent.name.startswith("models--"):
        return folder.parent.parent
    return folder


def outside_reason(folder: Path, path: Path) -> str | None:
    """Why `path` (inside `folder` by name) must not be read, or None when it may: a link out of the model's root,
    a link to a folder, a broken link, or something that is not a regular file."""
    root, target = model_root(folder), Path(os.path.realpath(path))
    if target != root and root not in target.parents:
        return f"it links to {target}, outside the model folder"
    if path.is_symlink() and target.is_dir():
        return "it links to a folder, and linked folders are not followed"
    if not target.exists():
        return "it is a broken link"
    if not target.is_file():
        return "it is not a regular file"
    return None


def require_inside(folder: Path, path: Path) -> None:
    """Refuse, in one CheckpointError line, a file the model cannot do without that breaks the rule."""
    reason = outside_reason(folder, path)
    if reason is not None:
        raise _refusal(path, reason)


def _refusal(path: Path, reason: str) -> CheckpointError:
    return CheckpointError(f"{path}: {reason}; weights, their index, the config and the provenance are only read "
                           "from inside the model folder")


@dataclass
class ModelFiles:
    files: list[str] = field(default_factory=list)  # POSIX paths relative to the folder, sorted
    left_out: dict[str, str] = field(default_factory=dict)  # relative path -> why it is not read


def model_files(folder: Path) -> ModelFiles:
    """Every non-hidden file of the folder that the rule lets be read, and those it does not, with the reason."""
    found = ModelFiles()
    for parent, folders, names in os.walk(folder):  # os.walk never enters a linked folder
        here = Path(parent)
        folders[:] = sorted(name for name in folders if not name.startswith("."))
        for name in [*(d for d in folders if (here / d).is_symlink()), *sorted(names)]:
            if name.startswith("."):
                continue
            relative = (here / name).relative_to(folder).as_posix()
            reason = outside_reason(folder, here / name)
            if reason is None:
                found.files.append(relative)
            else:
                found.left_out[relative] = reason
    found.files.sort()
    return found


def readable_files(folder: Path, essential: Callable[[str], bool], prog: str, verb: str) -> list[str]:
    """The files `prog` may read from `folder` by the rule: it refuses the folder when an `essential` file breaks
    it, and says in one warning line per file what it left out (`verb`: "copied", "uploaded")."""
    found = model_files(folder)
    for relative, reason in found.left_out.items():
        if essential(relative):
            raise _refusal(folder / relative, reason)
        warn(prog, f"{folder / relative} not {verb}: {reason}")
    return found.files
