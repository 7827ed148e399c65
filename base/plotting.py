"""matplotlib for the PNGs the tools write (gqa-uptrain's loss curve, gqa-eval's report plots): one setup.

Plots go to files only, on machines that often have no display, so pyplot runs on the Agg backend. matplotlib takes
about a second to import: it is imported when the first plot is drawn, never for `--help` (tests/test_help.py).
"""

from __future__ import annotations

from types import ModuleType


def pyplot() -> ModuleType:
    """`matplotlib.pyplot` on the Agg backend, set up on first use."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
