"""Gradient competition, figures: norm vs b per checkpoint with the exponent across
checkpoints, the normalized spread (cv) vs b, per-b norm histograms, the first checkpoint's
value histograms and the tail fraction above the common threshold vs b."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from batchlab.analysis.gradcomp_stats import HIST_BINS, HIST_RANGE, TAIL_K, norms_array
from batchlab.experiments.gradient_competition_claims import REGIMES, Replicate
from batchlab.experiments.options import GradientCompetition as GCOptions


def figures(rows: list[dict], fits: list[dict], reps: list[Replicate], o: GCOptions) -> dict[str, Any]:
    import matplotlib.pyplot as plt

    modes = o.modes
    figs: dict[str, Any] = {}
    colors = {"early": "tab:blue", "late": "tab:red"}
    fit = {(f["regime"], f["mode"]): f for f in fits}

    def sel(r: str, m: str, rep: Any) -> list[dict]:
        return [x for x in rows if x["kind"] == "norm" and x["regime"] == r and x["mode"] == m
                and x["replicate"] == rep]

    fig, axes = plt.subplots(1, len(modes), figsize=(5 * len(modes), 4), squeeze=False)
    for ax, m in zip(axes[0], modes):
        for r in REGIMES:
            f = fit.get((r, m), {})
            for i, rep in enumerate(reps):
                xs = sel(r, m, rep.seed)
                label = None
                if i == 0:
                    label = (f"{r}: p={f.get('exponent', math.nan):.2f} "
                             f"[{f.get('ci_low', math.nan):.2f}, {f.get('ci_high', math.nan):.2f}]")
                ax.plot([x["b"] for x in xs], [x["mean"] for x in xs], "o-", ms=3, lw=0.6,
                        color=colors[r], alpha=0.7, label=label)
        ax.set(xscale="log", yscale="log", xlabel="batch size b", ylabel="mean summed-gradient norm",
               title=f"{m}: one line per checkpoint seed")
        ax.legend(fontsize=7)
    figs["norm_vs_b.png"] = fig

    fig, axes = plt.subplots(1, len(modes), figsize=(5 * len(modes), 4), squeeze=False)
    for ax, m in zip(axes[0], modes):
        for r in REGIMES:
            for i, rep in enumerate(reps):
                xs = [x for x in sel(r, m, rep.seed) if x["cv"] > 0]
                ax.plot([x["b"] for x in xs], [x["cv"] for x in xs], "o--", ms=3, lw=0.6,
                        color=colors[r], label=r if i == 0 else None)
        ax.set(xscale="log", yscale="log", xlabel="batch size b", ylabel="std / mean of the norm",
               title=f"{m}: spread normalized to the same mean")
        ax.legend(fontsize=7)
    figs["normalized_vs_b.png"] = fig

    for r in REGIMES:
        bs = sorted(reps[0].recs[r]) if reps else []
        ncol = 5
        nrow = max(1, math.ceil(len(bs) / ncol))
        fig, axes = plt.subplots(nrow, ncol, figsize=(3 * ncol, 2.3 * nrow), squeeze=False)
        for ax, b in zip(axes.flat, bs):
            for m in modes:
                # each checkpoint's norms in units of its own mean, pooled for the picture
                parts = [v / np.mean(v) for v in (norms_array(rep.recs[r][b], m) for rep in reps)
                         if len(v) and np.mean(v) > 0]
                if parts:
                    ax.hist(np.concatenate(parts), bins=20, histtype="step", label=m)
            ax.set_title(f"b={b}", fontsize=8)
            ax.tick_params(labelsize=6)
        for ax in list(axes.flat)[len(bs):]:
            ax.axis("off")
        axes.flat[0].legend(fontsize=6)
        fig.suptitle(f"{r}: norms over trials, each in units of its checkpoint's mean")
        fig.tight_layout()
        figs[f"norm_hist_{r}.png"] = fig

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    edges = np.linspace(-HIST_RANGE, HIST_RANGE, HIST_BINS + 1)
    centers = (edges[1:] + edges[:-1]) / 2
    cmap = plt.get_cmap("viridis")
    m0 = "sample-sum" if "sample-sum" in modes else modes[0]
    for ax, r in zip(axes[:2], REGIMES):
        if not reps:
            break
        bs = sorted(reps[0].recs[r])
        for i, b in enumerate(bs):
            h = np.array(reps[0].recs[r][b]["modes"][m0]["values"]["hist"], float)
            ax.plot(centers, np.where(h > 0, h, np.nan), color=cmap(i / max(1, len(bs) - 1)),
                    lw=0.8, label=f"b={b}" if i % 3 == 0 or b == bs[-1] else None)
        ax.set(yscale="log", xlabel="value / RMS (first chunk)", ylabel="count",
               title=f"{r} [{m0}], checkpoint {reps[0].seed}: raw gradient values")
        ax.legend(fontsize=6)
    for m in modes:
        for r in REGIMES:
            for i, rep in enumerate(reps):
                xs = [x for x in sel(r, m, rep.seed) if x["tail_fraction"] > 0]
                axes[2].plot([x["b"] for x in xs], [x["tail_fraction"] for x in xs], "o-", ms=2,
                             lw=0.6, color=colors[r],
                             alpha=0.4 + 0.3 * modes.index(m) / max(1, len(modes)),
                             label=f"{r} {m}" if i == 0 else None)
    axes[2].set(xscale="log", yscale="log", xlabel="batch size b",
                ylabel=f"fraction |value| >= {TAIL_K:g} x pooled RMS",
                title="tail vs b (one threshold for every b)")
    axes[2].legend(fontsize=6)
    fig.tight_layout()
    figs["value_hist.png"] = fig
    return figs
