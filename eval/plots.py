"""The report's plots, drawn with matplotlib: one function per PNG, from numbers `report.py` has already chosen.

matplotlib is imported, and set to its file-only Agg backend, by the first plot drawn: importing this module (or
the report) costs nothing and leaves matplotlib's global state alone.
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple


class Point(NamedTuple):
    """One model in a panel of `plot_quality_vs_kv`."""

    label: str
    kv_bytes_per_token: float
    kv_label: str  # the x tick label, e.g. "1.0 KiB"
    value: float
    base: bool
    color: str


def _pyplot():
    """pyplot on the Agg backend (files only, no display), set up on first use."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def cycle_colors(labels: list[str]) -> dict[str, str]:
    """One colour of matplotlib's cycle per candidate, the same in every plot."""
    return {label: f"C{i % 10}" for i, label in enumerate(labels)}


def plot_deltas(series: dict[str, list[dict]], colors: dict[str, str], path: Path) -> None:
    """Grouped bars: per series (a candidate), each row's delta at its task, whiskers at 2 standard errors.

    A row is a comparison row of `report.compare` (task, metric, delta, delta_stderr).
    """
    plt = _pyplot()
    ticks = {r["task"]: f"{r['task']}\n({r['metric']})" for rows in series.values() for r in rows}
    tasks = list(ticks)
    width = 0.8 / len(series)
    fig, ax = plt.subplots(figsize=(max(6.0, 1.1 * len(tasks) + 0.3 * len(tasks) * len(series)), 4))
    for i, (label, rows) in enumerate(series.items()):
        offset = (i - (len(series) - 1) / 2) * width
        xs = [tasks.index(r["task"]) + offset for r in rows]
        whiskers = [2 * r["delta_stderr"] if r["delta_stderr"] else 0.0 for r in rows]
        ax.bar(xs, [r["delta"] for r in rows], width, yerr=whiskers, capsize=3, label=label, color=colors[label])
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set_xticks(range(len(tasks)), [ticks[t] for t in tasks], fontsize=8)
    ax.set_ylabel("candidate - base")
    ax.set_title("Quality delta vs base (whiskers: 2 standard errors)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_quality_vs_kv(panels: list[tuple[str, list[Point]]], path: Path) -> None:
    """A panel per measure (its y-axis name and one point per model) against KV-cache bytes per token, log scale."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4), squeeze=False)
    for ax, (name, points) in zip(axes[0], panels):
        for point in points:
            x, y = point.kv_bytes_per_token, point.value
            ax.scatter(x, y, marker="s" if point.base else "o", s=40, color=point.color)
            ax.annotate(point.label, (x, y), textcoords="offset points", xytext=(5, 5), fontsize=8)
        ticks = dict(sorted({(p.kv_bytes_per_token, p.kv_label) for p in points}))
        ax.set_xscale("log", base=2)
        ax.set_xticks(list(ticks), list(ticks.values()), fontsize=8)
        ax.minorticks_off()
        ax.set_xlabel("KV cache per token")
        ax.set_ylabel(name)
    fig.suptitle("Quality vs KV-cache size")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
