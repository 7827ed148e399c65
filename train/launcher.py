"""Training processes stop when their launcher is gone.

`accelerate launch` and torchrun start each worker in a session of its own, so killing only the launcher (kill -9,
a lost SSH session, a scheduler that signals one pid) leaves the workers training into the same output folder. A
worker started by a launcher (LOCAL_RANK or WORLD_SIZE in its environment) therefore watches its parent: when the
parent process changes (the worker was orphaned and adopted by init or a subreaper), it stops itself with SIGTERM,
as the launcher would have. It polls os.getppid() from a daemon thread rather than using prctl(PR_SET_PDEATHSIG),
which fires when the *thread* that started the worker exits, not the launcher; the cost is one check a second.
Progress since the last checkpoint is lost, as with any kill; the same command resumes.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time

_POLL_S = 1.0
_GRACE_S = 10.0  # after SIGTERM, for a process whose SIGTERM handler does not end it
_watching = False


def launched_by_a_launcher() -> bool:
    return any(name in os.environ for name in ("LOCAL_RANK", "WORLD_SIZE", "TORCHELASTIC_RUN_ID"))


def watch_launcher(force: bool = False) -> bool:
    """Start watching the parent process (once per process) if a launcher started this one; True if watching."""
    global _watching
    if _watching:
        return True
    if not (force or launched_by_a_launcher()):
        return False
    parent = os.getppid()
    if parent == 1:  # orphaned already, or a launcher that is itself init (a container's entry point)
        return False
    threading.Thread(target=_watch, args=(parent,), name="gqa-uptrain-launcher-watch", daemon=True).start()
    _watching = True
    return True


def _watch(parent: int) -> None:
    while os.getppid() == parent:
        time.sleep(_POLL_S)
    rank = os.environ.get("RANK", "0")
    print(f"gqa-uptrain: the launcher (pid {parent}) is gone: stopping this training process (rank {rank}, pid "
          f"{os.getpid()}); the same command resumes from the newest checkpoint", file=sys.stderr, flush=True)
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(_GRACE_S)
    os._exit(128 + signal.SIGTERM)
