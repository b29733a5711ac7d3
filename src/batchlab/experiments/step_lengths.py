"""Step lengths across batch sizes (Gao & Zhong's structural measurements): per optimizer step,
the gradient norm, the parameter-update length and the loss-update length, averaged per epoch,
and the top Hessian eigenvalue of each layer's block over training (probe `steplengths`).

Plain SGD at one lr for every batch size (the study's setting: only the batch size changes).
Options (--set): batch_sizes (comma list), epochs, lr.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from batchlab.experiments import Claim, Context, Experiment, Output
from batchlab.experiments import verdicts_legacy as V
from batchlab.experiments.outputs import md_table, plt

METRICS = ("step_grad_norm", "step_update_norm", "step_loss_update")


def run(ctx: Context) -> Output:
    o = ctx.options
    default = "64,256,1024,4096" if ctx.paper else "64,256,1024"
    sizes = [int(b) for b in str(o.get("batch_sizes", default)).split(",")]
    epochs = int(o.get("epochs", 20 if ctx.paper else 4))
    lr = float(o.get("lr", 0.01))
    seeds = ctx.seed_list
    configs = [ctx.config(batch_size=b, epochs=epochs, lr=lr, seed=s,
                          probes=["geometry", "steplengths"]) for b in sizes for s in seeds]
    results = ctx.run_many(configs, label="step-lengths")
    rows: list[dict[str, Any]] = []
    for cfg, res in zip(configs, results):
        for e in res.epochs[1:]:
            rows.append({"batch_size": cfg.batch_size, "seed": cfg.seed, "epoch": e["epoch"],
                         "test_acc": e.get("test_acc"),
                         **{k: v for k, v in e.items()
                            if k in METRICS or k.startswith("curv_layer")}})

    means = []
    for b in sizes:
        sel = [r for r in rows if r["batch_size"] == b]
        means.append({"batch_size": b, **{m: float(np.nanmean([r.get(m, np.nan) for r in sel]))
                                          for m in METRICS}})
    v, ev, rule = V.monotone([m["batch_size"] for m in means],
                             [m["step_grad_norm"] for m in means], increasing=False,
                             min_effect=0.0, what="mean per-step gradient norm vs batch size")
    claims = [Claim("grad-norm-decreases", "the per-step gradient norm shrinks as the batch "
                    "grows (less gradient noise)", v, ev, rule)]
    v, ev, rule = V.monotone([m["batch_size"] for m in means],
                             [m["step_update_norm"] for m in means], increasing=False,
                             min_effect=0.0, what="mean parameter-update length vs batch size")
    claims.append(Claim("update-length-decreases", "at a fixed lr the parameter-update length "
                        "per step shrinks as the batch grows", v, ev, rule))
    summary = (f"Plain SGD, lr {lr}, {epochs} epochs, batch sizes {sizes}, seeds {seeds}. "
               "Means over all recorded steps (every 5th step):\n\n"
               + md_table(means, ["batch_size", *METRICS]))
    return Output(rows=rows, summary=summary, claims=claims, figures={
        "step_lengths.png": _figure(rows, sizes)})


def _figure(rows: list[dict[str, Any]], sizes: list[int]) -> Any:
    curv = sorted({k for r in rows for k in r if k.startswith("curv_layer")})
    keys = [*METRICS, *curv]
    fig, axes = plt.subplots(1, len(keys), figsize=(3.3 * len(keys), 3))
    for ax, k in zip(np.atleast_1d(axes), keys):
        for b in sizes:
            sel = [r for r in rows if r["batch_size"] == b and r["seed"] == rows[0]["seed"]]
            ax.plot([r["epoch"] for r in sel], [r.get(k, np.nan) for r in sel], "o-",
                    label=f"B={b}", ms=3)
        ax.set_title(k, fontsize=9)
        ax.set_xlabel("epoch")
    np.atleast_1d(axes)[0].legend(fontsize=7)
    fig.tight_layout()
    return fig


EXPERIMENT = Experiment(
    name="step-lengths",
    title="Gradient, update and loss-update step lengths across batch sizes",
    run=run,
    description="Per-step structural measurements and per-layer curvature vs batch size.",
)
