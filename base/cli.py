"""What every gqa-* command shares: user mistakes end in one line on stderr and a non-zero exit."""

from __future__ import annotations

import _thread
import errno
import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Callable

from gqa_uptrain.errors import GqaError

_ctrl_c = threading.Event()


def run_cli(prog: str, command: Callable[[], None]) -> None:
    """Run `command`; report a GqaError, a full disk or Ctrl-C as one line instead of a traceback."""
    with _noting_ctrl_c():
        try:
            command()
        except KeyboardInterrupt:
            _exit(prog, "interrupted", 130)
        except Exception as e:
            if ctrl_c_pressed():  # a library turned the KeyboardInterrupt into an error of its own
                _exit(prog, "interrupted", 130)
            if isinstance(e, GqaError):
                _exit(prog, f"error: {e}", 2)
            if not isinstance(e, OSError) or e.errno != errno.ENOSPC:
                raise
            where = f" while writing {e.filename}" if e.filename else ""
            _exit(prog, f"error: disk full{where}", 2)


def ctrl_c_pressed() -> bool:
    """Whether Ctrl-C came while run_cli ran the command. Libraries turn the KeyboardInterrupt it raises into errors
    of their own (an import interrupted in a class body: RuntimeError; matplotlib drawing: ValueError), so code that
    catches errors asks this before taking one for a failure and going on."""
    return _ctrl_c.is_set()


@contextmanager
def _noting_ctrl_c() -> Iterator[None]:
    """Note Ctrl-C in the block, which raises KeyboardInterrupt as before. Only where Python's own handler is in
    place: not where Ctrl-C is ignored (a background job), nor in a thread, which cannot set one."""
    if (threading.current_thread() is not threading.main_thread()
            or signal.getsignal(signal.SIGINT) is not signal.default_int_handler):
        yield
        return
    _ctrl_c.clear()
    signal.signal(signal.SIGINT, _on_ctrl_c)
    unraisable_hook, sys.unraisablehook = sys.unraisablehook, _ctrl_c_again(sys.unraisablehook)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)
        sys.unraisablehook = unraisable_hook
        _ctrl_c.clear()  # the Python API, called later in this process, is not interrupted


def _on_ctrl_c(signum: int, frame) -> None:
    _ctrl_c.set()
    raise KeyboardInterrupt


def _ctrl_c_again(hook: Callable) -> Callable:
    """Ctrl-C that lands where Python cannot raise (a weakref callback or __del__ run by the garbage collector) is
    printed as "Exception ignored" and lost, and the command goes on: signal it again, a moment later (from this
    very hook it would land here again, and be lost the same way)."""
    def on_unraisable(unraisable) -> None:
        if isinstance(unraisable.exc_value, KeyboardInterrupt):
            threading.Timer(0.01, _thread.interrupt_main, (signal.SIGINT,)).start()
        else:
            hook(unraisable)
    return on_unraisable


def warn(prog: str, message: str) -> None:
    """One line on stderr about something the command did not do, and carried on without."""
    print(f"{prog}: warning: {message}", file=sys.stderr, flush=True)


def _exit(prog: str, message: str, code: int) -> None:
    print(f"{prog}: {message}", file=sys.stderr)
    sys.exit(code)
