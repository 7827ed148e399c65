"""What every gqa-* command shares: user mistakes end in one line on stderr and a non-zero exit."""

from __future__ import annotations

import errno
import sys
from typing import Callable

from gqa_uptrain.errors import GqaError


def run_cli(prog: str, command: Callable[[], None]) -> None:
    """Run `command`; report a GqaError, a full disk or Ctrl-C as one line instead of a traceback."""
    try:
        command()
    except GqaError as e:
        _exit(prog, f"error: {e}", 2)
    except KeyboardInterrupt:
        _exit(prog, "interrupted", 130)
    except OSError as e:
        if e.errno != errno.ENOSPC:
            raise
        where = f" while writing {e.filename}" if e.filename else ""
        _exit(prog, f"error: disk full{where}", 2)


def warn(prog: str, message: str) -> None:
    """One line on stderr about something the command did not do, and carried on without."""
    print(f"{prog}: warning: {message}", file=sys.stderr, flush=True)


def _exit(prog: str, message: str, code: int) -> None:
    print(f"{prog}: {message}", file=sys.stderr)
    sys.exit(code)
