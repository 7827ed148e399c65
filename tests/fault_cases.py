"""The fault tests' one harness: a table of cases per tool (test_hostile for gqa-convert, test_faults for gqa-eval,
test_wrong_results for gqa-uptrain), each case a fault and what the command must then say and leave behind."""

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Case:
    """`prepare` makes the fault in a test's world and returns the command's arguments; the command exits `code`
    (2: refused, in one error line holding `line`; 0: done); `holds` checks the world afterwards (nothing lost,
    nothing half-written)."""

    prepare: Callable[[Any], list]
    code: int
    line: str
    holds: Callable[[Any], bool]


def refused_in_one_line(prog: str, err: str, line: str) -> str:
    """The one `PROG: error` line of a refused command's stderr, which holds `line` and ends it, no traceback."""
    assert "Traceback" not in err, err[-3000:]
    said = [text for text in err.splitlines() if text.startswith(f"{prog}: error")]
    assert len(said) == 1 and line in said[0], err[-3000:]
    assert err.strip().splitlines()[-1] == said[0], err[-3000:]
    return said[0]
