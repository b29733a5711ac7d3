"""Gradient competition, figures: norm vs b with the power-law fits, normalized spread,
per-b norm histograms, pooled value histograms and tails."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from batchlab.analysis.gradcomp_stats import HIST_BINS, HIST_RANGE, TAIL_K, norms_array
from batchlab.experiments.gradient_competition_claims import REGIMES


def figures(rows: list[dict], fits: dict, recs: dict, o: dict) -> dict[str, Any]:
    import matplotlib.pyplot as plt

    modes = o["modes"]
    figs: dict[str, Any] = {}
    colors = {"early": "tab:blue", "late": "tab:red"}

    def sel(r, m):
        return [x for x in rows if x["regime"] == r and x["mode"] == m and x["kind"] == "norm"]

    fig, axes = plt.subplots(1, len(modes), figsize=(5 * len(modes), 4), squeeze=False)
    for ax, m in zip(axes[0], modes):
        for r in REGIMES:
            xs = sel(r, m)
            b = np.array([x["b"] for x in xs])
            mu = np.array([x["mean"] for x in xs])
            sd = np.array([x["std"] for x in xs])
            f = fits[(r, m)]
            ax.errorbar(b, mu, yerr=sd, fmt="o", ms=3, capsize=2, color=colors[r],
                        label=f"{r}: p={f['exponent']:.2f} [{f['ci_low']:.2f}, {f['ci_high']:.2f}]")
            if math.isfinite(f["exponent"]):
                ax.plot(b, f["prefactor"] * b ** f["exponent"], "--", color=colors[r], lw=1)
        ax.set(xscale="log", yscale="log", xlabel="batch size b", ylabel="summed-gradient norm",
               title=f"{m}: mean ± std, fit c·b^p")
        ax.legend(fontsize=7)
    figs["norm_vs_b.png"] = fig

    fig, axes = plt.subplots(1, len(modes), figsize=(5 * len(modes), 4), squeeze=False)
    for ax, m in zip(axes[0], modes):
        for r in REGIMES:
            xs = sel(r, m)
            b = [x["b"] for x in xs]
            ax.plot(b, [x["norm_mean"] for x in xs], "-", color=colors[r], label=f"{r} mean")
            ax.plot(b, [x["norm_std"] for x in xs], "o--", ms=3, color=colors[r],
                    label=f"{r} std")
        ax.set(xscale="log", yscale="log", xlabel="batch size b",
               ylabel="norm × mu_max / mu_b", title=f"{m}: normalized to equal mean distance")
        ax.legend(fontsize=7)
    figs["normalized_vs_b.png"] = fig

    for r in REGIMES:
        bs = sorted(recs[r])
        ncol = 5
        nrow = math.ceil(len(bs) / ncol)
        fig, axes = plt.subplots(nrow, ncol, figsize=(3 * ncol, 2.3 * nrow), squeeze=False)
        for ax, b in zip(axes.flat, bs):
            for m in modes:
                # norm x mu_max / mu_b in units of mu_max = norm / mu_b: one axis for all modes
                v = norms_array(recs[r][b], m)
                if len(v) and np.mean(v) > 0:
                    ax.hist(v / np.mean(v), bins=20, histtype="step", label=m)
            ax.set_title(f"b={b}", fontsize=8)
            ax.tick_params(labelsize=6)
        for ax in list(axes.flat)[len(bs):]:
            ax.axis("off")
        axes.flat[0].legend(fontsize=6)
        fig.suptitle(f"{r}: normalized norms over trials (norm × mu_max / mu_b, in units of "
                     "mu_max)")
        fig.tight_layout()
        figs[f"norm_hist_{r}.png"] = fig

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    edges = np.linspace(-HIST_RANGE, HIST_RANGE, HIST_BINS + 1)
    centers = (edges[1:] + edges[:-1]) / 2
    cmap = plt.get_cmap("viridis")
    m0 = "displacement" if "displacement" in modes else modes[0]
    for ax, r in zip(axes[:2], REGIMES):
        bs = sorted(recs[r])
        for i, b in enumerate(bs):
            h = np.array(recs[r][b]["modes"][m0]["values"]["hist"], float)
            ax.plot(centers, np.where(h > 0, h, np.nan), color=cmap(i / max(1, len(bs) - 1)),
                    lw=0.8, label=f"b={b}" if i % 3 == 0 or b == bs[-1] else None)
        ax.set(yscale="log", xlabel="value / RMS (first chunk)", ylabel="count",
               title=f"{r} [{m0}]: pooled raw gradient values")
        ax.legend(fontsize=6)
    for m in modes:
        for r in REGIMES:
            xs = sel(r, m)
            axes[2].plot([x["b"] for x in xs], [x["tail_fraction"] for x in xs], "o-", ms=3,
                         color=colors[r], alpha=0.4 + 0.3 * modes.index(m) / max(1, len(modes)),
                         label=f"{r} {m}")
    axes[2].set(xscale="log", yscale="log", xlabel="batch size b",
                ylabel=f"fraction |value| > {TAIL_K:g} RMS", title="tail vs b")
    axes[2].legend(fontsize=6)
    fig.tight_layout()
    figs["value_hist.png"] = fig
    return figs


