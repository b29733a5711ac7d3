"""Figures a reviewer reads first: a forest plot per source (every primary claim's estimate and
95% interval against its region, coloured by outcome) and accuracy / generalization gap against
batch size with intervals.

A forest plot usually shares one axis; batchlab's claims are in different units (accuracy
differences, ratios, exponents, correlations), so every claim gets its own row with its own
x-axis, the claimed region shaded: what matters is where the interval sits relative to the
region, which each row shows in the claim's own units.
"""

from __future__ import annotations

import io
import math
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

COLORS = {"reproduced": "#1a7f37", "not_reproduced": "#cf222e", "inconclusive": "#9a6700",
          "untestable": "#888888"}


def _bounds(region: dict[str, Any]) -> tuple[float, float]:
    if "above" in region:
        return float(region["above"]), math.inf
    if "below" in region:
        return -math.inf, float(region["below"])
    lo, hi = region["between"]
    return float(lo), float(hi)


def _num(v: Any) -> float:
    return float(v) if isinstance(v, (int, float)) and math.isfinite(v) else math.nan


def forest(claims: list[dict[str, Any]], title: str) -> Any:
    """One row per claim: region shaded, interval as a bar (an arrow where it is unbounded),
    estimate as a dot in the outcome's colour; the label names the claim and its outcome."""
    n = max(len(claims), 1)
    fig, axes = plt.subplots(n, 1, figsize=(8.5, 0.55 * n + 0.9), squeeze=False)
    for ax, c in zip(axes[:, 0], claims):
        lo_r, hi_r = _bounds(c["region"])
        est = _num(c.get("estimate"))
        lo, hi = (_num(v) if v is not None else (-math.inf if i == 0 else math.inf)
                  for i, v in enumerate(c["ci"]))
        finite = [v for v in (lo_r, hi_r, est, lo, hi) if math.isfinite(v)]
        if not finite:
            finite = [0.0, 1.0]
        a, b = min(finite), max(finite)
        pad = (b - a) * 0.25 or max(abs(a), 1.0) * 0.25
        x0, x1 = a - pad, b + pad
        ax.axvspan(max(lo_r, x0), min(hi_r, x1), color="#d9f2de", zorder=0)
        for edge in (lo_r, hi_r):
            if math.isfinite(edge):
                ax.axvline(edge, color="#1a7f37", lw=0.8, ls=":")
        color = COLORS.get(c["verdict"], "k")
        l_draw = lo if math.isfinite(lo) else x0
        h_draw = hi if math.isfinite(hi) else x1
        if math.isfinite(est) or math.isfinite(lo) or math.isfinite(hi):
            ax.plot([l_draw, h_draw], [0, 0], color=color, lw=2.2)
            for open_end, x, d in ((not math.isfinite(lo), x0, -1), (not math.isfinite(hi), x1, 1)):
                if open_end:  # an unbounded end: an arrow off the axis
                    ax.annotate("", xy=(x, 0), xytext=(x - d * (x1 - x0) * 0.06, 0),
                                arrowprops={"arrowstyle": "->", "color": color})
        if math.isfinite(est):
            ax.plot([est], [0], "o", color=color, ms=6)
        ax.set_xlim(x0, x1)
        ax.set_yticks([])
        ax.tick_params(axis="x", labelsize=7)
        ax.set_ylabel(f"{c.get('finding', '')} {c['id']}"[:40], rotation=0, ha="right",
                      va="center", fontsize=7)
        reason = (c.get("reason") or {}).get("code")
        ax.text(1.01, 0.5, c["verdict"].replace("_", " ") + (f" ({reason})" if reason else ""),
                transform=ax.transAxes, fontsize=7, color=color, va="center")
        for s in ("top", "right", "left"):
            ax.spines[s].set_visible(False)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0, 0.86, 0.97))
    return fig


def accuracy_vs_batch(rows: list[dict[str, Any]]) -> Any:
    """Final test accuracy and generalization gap (train - test) against batch size, mean and
    95% interval over seeds per batch size, on a log axis. `rows`: batch_size, metric, estimate,
    lo, hi (from the batch-size experiment's `accuracy_by_batch.csv`)."""
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for ax, metric, label in ((axes[0], "test_acc", "final test accuracy"),
                              (axes[1], "gap", "generalization gap (train - test)")):
        sel = sorted((r for r in rows if r["metric"] == metric), key=lambda r: r["batch_size"])
        b = [float(r["batch_size"]) for r in sel]
        m = [_num(r["estimate"]) for r in sel]
        lo = [_num(r["lo"]) for r in sel]
        hi = [_num(r["hi"]) for r in sel]
        err = [[max(x - y, 0) if math.isfinite(y) else 0 for x, y in zip(m, lo)],
               [max(y - x, 0) if math.isfinite(y) else 0 for x, y in zip(m, hi)]]
        ax.errorbar(b, m, yerr=err, fmt="o-", capsize=4)
        ax.set_xscale("log", base=2)
        ax.set(xlabel="batch size", ylabel=label, title=label)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def png(fig: Any) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return buf.getvalue()
