"""The report's plots, drawn with matplotlib: one function per PNG, from numbers `report.py` has already chosen.

matplotlib is imported, and set to its file-only Agg backend, by the first plot drawn: importing this module (or
the report) costs nothing and leaves matplotlib's global state alone.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import NamedTuple

from gqa_uptrain.plotting import pyplot


class Point(NamedTuple):
    """One model in a panel of `plot_quality_vs_kv`."""

    label: str
    kv_bytes_per_token: float
    kv_label: str  # the x tick label, e.g. "1.0 KiB"
    value: float
    base: bool
    color: str


def cycle_colors(labels: list[str]) -> dict[str, str]:
    """One colour of matplotlib's cycle per candidate, the same in every plot."""
    return {label: f"C{i % 10}" for i, label in enumerate(labels)}


# The panels of deltas.png, one per kind of metric, so that no kind sets another's scale (a LAMBADA perplexity
# delta of 13 million once flattened every accuracy bar to nothing): its y-axis label and whether it is a ratio.
SCORE, RATIO, OTHER = "score", "ratio", "other"
PANELS = {
    SCORE: ("score: candidate - base", False),
    RATIO: ("perplexity: candidate / base, log scale", True),
    OTHER: ("other metrics: candidate - base", False),
}


def metric_kind(rows: list[dict]) -> str:
    """The panel of one (task, metric), from its rows for every candidate: perplexities (lower is better, unbounded,
    apart by orders of magnitude after a bad conversion) are compared as a ratio on a log axis; scores in [0, 1]
    (accuracies, their average, exact match, F1) as a difference; anything else (BLEU, bits per byte) on an axis of
    its own."""
    values = [v for r in rows for v in (r["base"], r["candidate_value"])]
    if "perplexity" in rows[0]["metric"] and all(v > 0 for v in values):
        return RATIO
    return SCORE if all(0 <= v <= 1 for v in values) else OTHER


def _bar(row: dict, ratio: bool) -> tuple[float, tuple[float, float]]:
    """A row's bar height and its whiskers (below, above) at two standard errors. A ratio's are those of its log,
    by the delta method (sqrt of the sum of both squared relative stderrs), so that they stay above zero."""
    if not ratio:
        whisker = 2 * row["delta_stderr"] if row["delta_stderr"] else 0.0
        return row["delta"], (whisker, whisker)
    value = row["candidate_value"] / row["base"]
    if row["base_stderr"] is None or row["candidate_stderr"] is None:
        return value, (0.0, 0.0)
    spread = 2 * math.hypot(row["base_stderr"] / row["base"], row["candidate_stderr"] / row["candidate_value"])
    return value, (value - value * math.exp(-spread), value * math.exp(spread) - value)


def deltas_figure(series: dict[str, list[dict]], colors: dict[str, str]):
    """Grouped bars: per series (a candidate), each row's delta at its (task, metric), whiskers at 2 standard errors;
    `*` over a delta beyond them. One panel per kind of metric (`metric_kind`), each with its own y axis: scores as
    candidate - base, perplexities as candidate / base on a log axis.

    A row is a comparison row of `report.compare` (task, metric, base, candidate_value, delta, their stderrs,
    significant).
    """
    plt = pyplot()
    by_key: dict[tuple[str, str], list[dict]] = {}
    for rows in series.values():
        for r in rows:
            by_key.setdefault((r["task"], r["metric"]), []).append(r)
    kinds = {key: metric_kind(rows) for key, rows in by_key.items()}
    panels = [(kind, [key for key in by_key if kinds[key] == kind]) for kind in PANELS]
    panels = [(kind, keys) for kind, keys in panels if keys]
    width = 0.8 / len(series)
    sizes = [max(2.5, 1.1 * len(keys) + 0.3 * len(keys) * len(series)) for _, keys in panels]
    fig, axes = plt.subplots(1, len(panels), figsize=(max(6.0, sum(sizes)), 4), squeeze=False,
                             gridspec_kw={"width_ratios": sizes})
    for ax, (kind, keys) in zip(axes[0], panels):
        ylabel, ratio = PANELS[kind]
        origin = 1.0 if ratio else 0.0
        for i, (label, rows) in enumerate(series.items()):
            rows = [r for r in rows if kinds[(r["task"], r["metric"])] == kind]
            offset = (i - (len(series) - 1) / 2) * width
            xs = [keys.index((r["task"], r["metric"])) + offset for r in rows]
            bars = [_bar(r, ratio) for r in rows]
            heights = [value - origin for value, _ in bars]
            whiskers = [[below for _, (below, _) in bars], [above for _, (_, above) in bars]]
            ax.bar(xs, heights, width, bottom=origin, yerr=whiskers, capsize=3, label=label, color=colors[label])
            for x, (value, (below, above)), row in zip(xs, bars, rows):
                if row.get("significant"):
                    up = value >= origin
                    ax.annotate("*", (x, value + above if up else value - below), ha="center",
                                va="bottom" if up else "top", fontsize=11)
        if ratio:
            ax.set_yscale("log")
        ax.axhline(origin, color="black", linewidth=0.8)
        ax.set_xticks(range(len(keys)), [f"{task}\n({metric})" for task, metric in keys], fontsize=8)
        ax.set_ylabel(ylabel)
    axes[0][0].legend(fontsize=8)
    fig.suptitle("Quality vs base (whiskers: 2 standard errors; *: beyond them)")
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

    plt = pyplot()
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
    pyplot().close(fig)
