"""Waiting on another process in the fault tests: until something it does is seen, or until it is gone."""

import subprocess
import time
from collections.abc import Callable
from pathlib import Path


def wait_for(condition: Callable[[], object], seconds: float, what: str,
             process: subprocess.Popen | None = None) -> None:
    """Poll `condition` until it holds; fail with `what` after `seconds`, or as soon as `process` (if given) ends,
    with the end of its stderr where it was piped."""
    deadline = time.monotonic() + seconds
    while not condition():
        assert process is None or process.poll() is None, f"{what}: {(process.communicate()[1] or '')[-3000:]}"
        assert time.monotonic() < deadline, what
        time.sleep(0.01)


def gone(pid: int) -> bool:
    """Whether the process has ended: every thread of it (a zombie that nobody reaps counts as ended; its files,
    and so its flock, are closed only when its last thread has exited)."""
    try:
        tasks = list(Path(f"/proc/{pid}/task").iterdir())
        return all((task / "stat").read_text().rsplit(")", 1)[1].split()[0] in "ZX" for task in tasks)
    except FileNotFoundError:
        return True
