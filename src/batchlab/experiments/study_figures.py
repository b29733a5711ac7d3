"""The study's curve figures: mean over seeds with a +-sd band, train dashed, test solid.

Apart from `study` (the runs and their statistics) because drawing is the last step of the
data flow: nothing in the claims depends on it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from batchlab.experiments.outputs import plt
from batchlab.experiments.study import Group


def plot_curves(ax: Any, groups: Sequence[Group], metric: str, *, x: str = "epoch",
                scale: float = 1.0, last: int | None = None, style: str = "-",
                colors: dict[str, Any] | None = None, label_suffix: str = "",
                legend: bool = True) -> None:
    """Mean curve over seeds per group (shaded ± sd with 2+ seeds). With `last`, only the
    last `last` epochs, re-numbered 1..last (the switch experiment's view)."""
    for i, g in enumerate(groups):
        xs, m, s = g.curve(metric, x=x)
        if last is not None:
            xs, m, s = xs[-last:], m[-last:], s[-last:]
            xs = np.arange(1, len(xs) + 1)
        ok = np.isfinite(m)  # epochs a run did not evaluate (`eval_every`) are gaps: join over them
        xs, m, s = xs[ok], m[ok], s[ok]
        color = (colors or {}).get(g.name, f"C{i % 10}")
        ax.plot(xs, m * scale, style, color=color,
                label=(g.name + label_suffix) if legend else None)
        if np.any(s > 0):
            ax.fill_between(xs, (m - s) * scale, (m + s) * scale, color=color, alpha=0.15,
                            linewidth=0)


def accuracy_figure(groups: Sequence[Group], title: str, last: int | None = None,
                    xlabel: str = "epoch", zoom: float | None = None) -> Any:
    """Train (dashed) and test (solid) accuracy per epoch, one color per configuration, plus
    a second panel of the losses. `zoom` sets the lower limit of the accuracy axis (%)."""
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(12, 4.5))
    colors = {g.name: f"C{i % 10}" for i, g in enumerate(groups)}
    plot_curves(ax, groups, "test_acc", scale=100, last=last, colors=colors,
                label_suffix=" (test)")
    plot_curves(ax, groups, "train_acc", scale=100, last=last, style="--", colors=colors,
                label_suffix=" (train)")
    ax.set(title=f"{title}: accuracy", xlabel=xlabel, ylabel="accuracy (%)")
    if zoom is not None:
        ax.set_ylim(bottom=zoom, top=100.2)
    plot_curves(bx, groups, "test_loss", last=last, colors=colors, label_suffix=" (test)")
    plot_curves(bx, groups, "train_loss", last=last, style="--", colors=colors,
                label_suffix=" (train)")
    bx.set(title=f"{title}: loss (NLL)", xlabel=xlabel, ylabel="mean NLL", yscale="log")
    for a in (ax, bx):
        a.grid(alpha=0.3)
    bottom_legend(fig, ax)
    return fig


def bottom_legend(fig: Any, ax: Any) -> None:
    """One legend under the panels, so it never hides a curve."""
    handles, labels = ax.get_legend_handles_labels()
    fig.tight_layout()
    fig.legend(handles, labels, loc="upper center", bbox_to_anchor=(0.5, 0.0), fontsize=8,
               ncol=2 if len(labels) > 1 else 1, frameon=False)  # test | train columns


def zoom_floor(groups: Sequence[Group], margin: float = 3.0) -> float:
    """A lower accuracy limit (%) that shows where the curves end up, not epoch 0's 10%."""
    finals = [v for g in groups for v in g.final("test_acc") if math.isfinite(v)]
    if not finals:
        return 0.0
    return max(0.0, min(finals) * 100 - margin * 3)
