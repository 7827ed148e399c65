"""The loss curve PNG: training and validation loss against tokens, with the teacher's level."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from gqa_uptrain.plotting import pyplot

from .recovery import Gap


def plot_loss_curve(records: list[dict[str, Any]], path: Path) -> None:
    """Training and validation loss against tokens seen, as a PNG (`loss_figure`)."""
    figure = loss_figure(records)
    figure.savefig(path)
    pyplot().close(figure)


def loss_figure(records: list[dict[str, Any]]):
    """The loss curves, with the teacher's validation loss (the original model's, measured at step 0) as the level
    the conversion's gap closes towards."""
    plt = pyplot()
    figure, axes = plt.subplots(figsize=(7, 4), dpi=120)
    for key, label in (("loss", "train"), ("val_loss", "validation")):
        points = [(r["tokens"], r[key]) for r in records if key in r]
        if points:
            axes.plot(*zip(*points), marker="o" if key == "val_loss" else None, label=label)
    gap = Gap.of(records)
    if gap is not None:
        share = gap.recovered(next(r["val_loss"] for r in reversed(records) if "val_loss" in r))
        recovered = f": {share:.0%} of the gap recovered" if share is not None else ""
        axes.axhline(gap.reference, color="black", linestyle="--", linewidth=1, label=f"teacher, validation{recovered}")
    axes.set_xlabel("tokens")
    axes.set_ylabel("loss (nats per token)")
    axes.set_title("gqa-uptrain loss curve")
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    return figure
