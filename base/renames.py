"""Putting a finished output folder in place: renames that never replace by accident, an atomic swap, and the
one way every tool publishes a folder (its files on disk first)."""

from __future__ import annotations

import ctypes
import errno
import os
import shutil
from pathlib import Path

from gqa_uptrain.atomic_write import flush_to_disk

# renameat2(2) flags (linux/fs.h); AT_FDCWD makes the paths relative to the working folder, as os.rename's are.
_RENAME_NOREPLACE, _RENAME_EXCHANGE, _AT_FDCWD = 1, 2, -100
# What renameat2 answers where the kernel, the C library or the file system cannot do it (NFS, some FUSE).
_UNSUPPORTED = {errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP}


def _renameat2(source: Path, target: Path, flags: int) -> bool:
    """renameat2 through the C library; False where it is not available for these paths, OSError on a real
    failure."""
    function = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if function is None:  # not Linux, or a C library older than glibc 2.28
        return False
    if function(_AT_FDCWD, os.fsencode(source), _AT_FDCWD, os.fsencode(target), flags) == 0:
        return True
    code = ctypes.get_errno()
    if code in _UNSUPPORTED:
        return False
    raise OSError(code, os.strerror(code), str(source), None, str(target))


def rename_no_replace(source: Path, target: Path) -> None:
    """Rename `source` to `target`; FileExistsError when `target` exists (os.rename would replace an empty folder
    or a file there). Atomic on Linux; elsewhere checked just before renaming."""
    if _renameat2(source, target, _RENAME_NOREPLACE):
        return
    if os.path.lexists(target):
        raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(target))
    os.rename(source, target)


def exchange_paths(first: Path, second: Path) -> bool:
    """Swap two existing paths in one step (Linux renameat2 RENAME_EXCHANGE): at no instant does either name
    point at nothing. False, with nothing changed, where the system or file system cannot swap."""
    return _renameat2(first, second, _RENAME_EXCHANGE)


def move_into_place(work: Path, output: Path, replace: bool) -> None:
    """Put the finished folder `work` (beside `output`, on its file system) in place as `output`: the one way every
    tool publishes a folder. Its files are fsynced first: without that a crash soon after can leave a
    complete-looking output whose files are empty or cut short.

    Without `replace`, FileExistsError when `output` exists. With it, an existing output is swapped with `work` in
    one step, then deleted, so that the old folder or the new one exists at every instant. Where the file system
    cannot swap, the old output is set aside as `.NAME.old-SUFFIX` (SUFFIX: what follows the last `-` in `work`'s
    name) and moved back on any failure; only a crash between the two renames leaves it there."""
    flush_to_disk(work.rglob("*"))
    if not os.path.lexists(output) or not replace:
        rename_no_replace(work, output)
        return
    if exchange_paths(work, output):
        shutil.rmtree(work)  # the old folder, now under the temporary name
        return
    aside = output.with_name(f".{output.name}.old-{work.name.rsplit('-', 1)[-1]}")
    try:
        os.rename(output, aside)
        os.rename(work, output)
    except BaseException:
        if os.path.lexists(aside) and not os.path.lexists(output):
            os.rename(aside, output)
        raise
    shutil.rmtree(aside)
