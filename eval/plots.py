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


def deltas_figure(series: dict[str, list[dict]], colors: dict[str, str]):
    """Grouped bars: per series (a candidate), each row's delta at its (task, metric), whiskers at 2 standard errors;
    `*` over a delta beyond them.

    A row is a comparison row of `report.compare` (task, metric, delta, delta_stderr, significant).
    """
    plt = _pyplot()
    keys = list(dict.fromkeys((r["task"], r["metric"]) for rows in series.values() for r in rows))
    width = 0.8 / len(series)
    fig, ax = plt.subplots(figsize=(max(6.0, 1.1 * len(keys) + 0.3 * len(keys) * len(series)), 4))
    for i, (label, rows) in enumerate(series.items()):
        offset = (i - (len(series) - 1) / 2) * width
        xs = [keys.index((r["task"], r["metric"])) + offset for r in rows]
        deltas = [r["delta"] for r in rows]
        whiskers = [2 * r["delta_stderr"] if r["delta_stderr"] else 0.0 for r in rows]
        ax.bar(xs, deltas, width, yerr=whiskers, capsize=3, label=label, color=colors[label])
        for x, delta, whisker, row in zip(xs, deltas, whiskers, rows):
            if row.get("significant"):
                ax.annotate("*", (x, delta + (whisker if delta >= 0 else -whisker)), ha="center",
                            va="bottom" if delta >= 0 else "top", fontsize=11)
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set_xticks(range(len(keys)), [f"{task}\n({metric})" for task, metric in keys], fontsize=8)
    ax.set_ylabel("candidate - base")
    ax.set_title("Quality delta vs base (whiskers: 2 standard errors; *: beyond them)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def plot_deltas(series: dict[str, list[dict]], colors: dict[str, str], path: Path) -> None:
    """deltas.png (see `deltas_figure`)."""
    _save(deltas_figure(series, colors), path)


def spans_decades(values: list[float]) -> bool:
    """Whether positive values differ by more than a factor of ten: a linear axis would flatten the small ones."""
    return min(values) > 0 and max(values) > 10 * min(values)


def quality_vs_kv_figure(panels: list[tuple[str, list[Point]]]):
    """A panel per measure (its y-axis name and one point per model) against KV-cache bytes per token, log scale;
    the y axis too where the measure spans more than a decade. The legend names the base's square marker."""
    from matplotlib.lines import Line2D

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
        if spans_decades([p.value for p in points]):
            ax.set_yscale("log")
            name += ", log scale"
        ax.set_xlabel("KV cache per token")
        ax.set_ylabel(name)
        markers = [Line2D([], [], marker="s", linestyle="", color="black", label=f"base ({p.label})")
                   for p in points if p.base][:1]  # the base's quantized-cache rows share its marker
        if any(not p.base for p in points):
            markers.append(Line2D([], [], marker="o", linestyle="", color="grey", label="candidates (labelled)"))
        ax.legend(handles=markers, fontsize=8)
    fig.suptitle("Quality vs KV-cache size")
    fig.tight_layout()
    return fig


def plot_quality_vs_kv(panels: list[tuple[str, list[Point]]], path: Path) -> None:
    """quality_vs_kv_cache.png (see `quality_vs_kv_figure`)."""
    _save(quality_vs_kv_figure(panels), path)


def _save(fig, path: Path) -> None:
    fig.savefig(path, dpi=120)
    _pyplot().close(fig)
