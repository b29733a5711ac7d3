"""The recommend figure: B_simple over the measurement run, samples/s and predicted time to
target vs batch size, with the recommendation and B_crit marked."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any


def figure(rep: dict[str, Any], path: Path) -> None:
    """Write the three-panel figure to `path` (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    h = [x for x in rep["noise_scale"]["history"] if x.get("b_simple") is not None]
    ax = axes[0]
    if h:
        st = [x["step"] if x["step"] is not None else math.nan for x in h]
        ax.semilogy(st, [x["b_simple"] for x in h], "o-", label="B_simple (probe, 512 ex.)")
        ax2 = ax.twinx()
        ax2.plot(st, [x["loss"] for x in h], "C2.--", label="loss")
        ax2.set_ylabel("loss on the probe sample", color="C2")
    ns = rep["noise_scale"]
    fp = ns["final_point"]
    v = fp["b_simple"]
    if v is not None and v > 0:
        # a bootstrap interval need not contain the point estimate, and an end may be unbounded
        lo, hi = (c if c is not None else v for c in fp["ci"])
        ax.errorbar([fp["step"]], [v], yerr=[[max(0.0, v - lo)], [max(0.0, hi - v)]],
                    fmt="s", color="C3", label="B_simple at end, 2048 ex. (95% CI)")
    if ns["b_simple"]:
        ax.hlines(ns["b_simple"], *ns["window_steps"], color="C1", lw=3,
                  label=f"averaged over steps {ns['window_steps'][0]}..{ns['window_steps'][1]}")
    ax.set_xlabel("step of the measurement run")
    ax.set_ylabel("B_simple")
    ax.legend(fontsize=8, loc="upper left")
    ok = [r for r in rep["throughput"] if r.get("status") == "ok"]
    b = [r["batch_size"] for r in ok]
    axes[1].loglog(b, [r["samples_per_s"] for r in ok], "o-")
    axes[1].set_xlabel("batch size")
    axes[1].set_ylabel("samples / s (this device)")
    axes[2].loglog(b, [r["predicted_seconds"] for r in ok], "o-", label="predicted time")
    axes[2].axvline(rep["recommended_batch_size"], color="C1", ls=":",
                    label=f"recommended {rep['recommended_batch_size']}")
    axes[2].axvline(rep["critical_batch_size"], color="C3", ls="--",
                    label=f"B_crit {rep['critical_batch_size']:.3g}")
    axes[2].set_xlabel("batch size")
    axes[2].set_ylabel("seconds to the measurement run's loss")
    axes[2].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110, format="png")
    plt.close(fig)
