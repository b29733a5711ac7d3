"""Throughput and memory vs batch size on the current device, and time to target.

A larger batch is cheaper per example only until the device saturates; past that, steps cost
proportionally more and only the steps saved (steps-to-target) still help. Samples/s is timed
on the engine `train()` uses (the fused SGD path for batchlab's MLPs, autograd + SGD for other
models) with resident data and `index_select` batches, after warm-up steps. Peak memory: on
CUDA `torch.cuda.max_memory_allocated`; on the CPU the growth of the process's peak RSS
(`ru_maxrss`) while that batch size ran, plus the peak itself (a peak only grows, so batch
sizes run in increasing order). An out-of-memory error at one batch size is recorded and the
grid goes on.

time-to-target(B) = steps-to-target(B) x seconds/step(B), with steps from the steps-to-target
sweep (through the store: run it first to reuse it) where measured and from its fitted
S(B) = S_min + E_min/B elsewhere.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from batchlab.analysis.throughput import (
    best_for_time,
    is_oom,
    measure,
    measure_stored,
    time_to_target,
)
from batchlab.experiments import Claim, Context, Experiment, Output
from batchlab.experiments.outputs import md_table
from batchlab.experiments.verdicts import greater


def figure(rows: list[dict[str, Any]]):
    import matplotlib.pyplot as plt

    ok = [r for r in rows if r.get("status") == "ok"]
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    b = [r["batch_size"] for r in ok]
    axes[0].loglog(b, [r["samples_per_s"] for r in ok], "o-")
    axes[0].set_ylabel("samples / s")
    axes[1].semilogx(b, [r.get("peak_memory_mb", math.nan) for r in ok], "o-")
    axes[1].set_ylabel("peak memory (MB; CPU: peak-RSS growth)")
    tt = [r for r in ok if r.get("time_to_target_s") is not None]
    if tt:
        axes[2].loglog([r["batch_size"] for r in tt], [r["time_to_target_s"] for r in tt], "o-")
        bst = best_for_time(rows)
        axes[2].axvline(bst["batch_size"], color="C1", ls=":", label=f"best B={bst['batch_size']}")
        axes[2].legend()
    axes[2].set_ylabel("predicted time to target (s)")
    for ax in axes:
        ax.set_xlabel("batch size")
    fig.tight_layout()
    return fig


def run(ctx: Context) -> Output:
    from batchlab.engine.train import build_model, get_data, resolve_device
    from batchlab.experiments import steps_to_target as stt

    s = stt.settings(ctx)
    extra = {"hidden": s["hidden"]} if "hidden" in s else {}
    cfg = ctx.config(**extra)
    dev = resolve_device(cfg.device)
    td = get_data(cfg, dev)
    grid = ctx.options.get("batch_sizes") or [2**k for k in range(4, 14)]
    grid = [b for b in grid if b <= td.n_train]
    # through the store: timed once per device, model shape, batch size and engine
    tp = measure_stored(build_model(cfg, td), td.x_train, td.y_train, grid, ctx.store)
    _, best, _ = stt.measure(ctx)
    reached = [r for r in best if r["reached"]]
    steps = {r["batch_size"]: r["steps_to_target"] for r in reached}
    fit = stt.fit_scaling(list(steps), list(steps.values())) if len(steps) >= 2 else None
    rows = time_to_target(tp, steps, fit)
    ok = [r for r in rows if r["status"] == "ok"]
    claims = []
    if len(ok) >= 2:
        v, ev, rule = greater([ok[-1]["samples_per_s"] / ok[0]["samples_per_s"]], [2.0], 0.0,
                              "throughput ratio largest/smallest batch vs 2")
        claims.append(Claim("throughput-grows", f"samples/s on {dev} grows with the batch size "
                            "(at least 2x from the smallest to the largest)", v, ev, rule))
    bst = best_for_time(rows)
    summary = [f"Device {dev}, {torch.get_num_threads()} threads. Timings on a shared machine "
               "are noisy.", "",
               md_table(rows, ["batch_size", "engine", "status", "samples_per_s",
                               "seconds_per_step", "peak_memory_mb", "steps_to_target",
                               "steps_source", "time_to_target_s"])]
    if bst:
        summary.append(f"Fastest to target: **batch {bst['batch_size']}** "
                       f"({bst['time_to_target_s']:.3g} s predicted).")
        tt = [r for r in rows if r.get("time_to_target_s") is not None]
        interior = tt[0]["batch_size"] < bst["batch_size"] < tt[-1]["batch_size"]
        claims.append(Claim("time-optimum-interior", "the batch size minimizing time to target lies "
                            "strictly inside the grid (throughput gains vs diminishing returns)",
                            "reproduced" if interior else "not_reproduced",
                            {"best_batch": bst["batch_size"], "grid_min": tt[0]["batch_size"],
                             "grid_max": tt[-1]["batch_size"]},
                            "reproduced if the argmin of predicted time is neither the smallest "
                            "nor the largest batch size with a prediction"))
    oom = [r["batch_size"] for r in rows if r["status"] == "oom"]
    if oom:
        summary.append(f"Out of memory at batch sizes {oom} (recorded, skipped).")
    return Output(rows=rows, summary="\n".join(summary), claims=claims,
                  figures={"throughput.png": figure(rows)})


__all__ = ["best_for_time", "is_oom", "measure", "time_to_target"]

EXPERIMENT = Experiment("throughput", "Throughput, memory and time to target vs batch size", run)
