"""Byte counts as people read them, in every message and table of the tools: one format.

Binary units (KiB = 1,024 bytes, as free(1), df -h and GPU memory are read), one decimal, whole bytes below 1 KiB.
"""

from __future__ import annotations

UNITS = ("B", "KiB", "MiB", "GiB", "TiB")


def human_size(nbytes: float, unit: str | None = None) -> str:
    """1536 -> '1.5 KiB', 512 -> '512 B'; `unit` fixes one unit for every row of a table ('GiB': 0.5 GiB, not
    512.0 MiB, beside the GiB a GPU has)."""
    if unit is None:
        unit = next((u for u in reversed(UNITS) if abs(nbytes) >= 1024 ** UNITS.index(u)), "B")
    if unit == "B":
        return f"{nbytes:.0f} B"
    return f"{nbytes / 1024 ** UNITS.index(unit):.1f} {unit}"
