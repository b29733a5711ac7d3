"""Throughput and memory vs batch size on the current device, and time to target.

How samples/s and peak memory are measured (and stored) is `batchlab.analysis.throughput`'s
job; see its docstring. This experiment turns the points into claims:

time-to-target(B) = steps-to-target(B) x seconds/step(B), with steps from the steps-to-target
sweep (through the store: run it first to reuse it) where measured and from its fitted
S(B) = S_min + E_min/B elsewhere.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from batchlab.analysis.throughput import (
    best_for_time,
    is_oom,
    measure,
    measure_stored,
    time_to_target,
)
from batchlab.experiments import Context, Experiment, Output
from batchlab.experiments import verdicts as V
from batchlab.experiments.base import QUICK_HIDDEN
from batchlab.experiments.claims import Claim
from batchlab.experiments.outputs import md_table


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


POW2_PROBE = [255, 256, 257, 1023, 1024, 1025]


def throughput_claims(ok: list[dict[str, Any]], pow2: list[dict[str, Any]],
                      seeds: dict[int, dict[int, float]]) -> list[Claim]:
    """P1 (throughput and memory grow with the batch, then saturate), P2 (a time-optimal batch
    size between the extremes), P5 (powers of two faster), K6's cost half (a step's time grows
    ~ linearly in m once the hardware is saturated)."""
    b = [r["batch_size"] for r in ok]
    out = [Claim("throughput-grows", "P1", "samples/s grow with the batch size",
                 V.correlation(b, [r["samples_per_s"] for r in ok]), V.above(0.5),
                 "Spearman rho(batch size, samples/s) over the grid",
                 {"grid": [(r["batch_size"], r["samples_per_s"]) for r in ok]}, primary=True)]
    mem = [(r["batch_size"], r.get("peak_memory_mb")) for r in ok if r.get("peak_memory_mb")]
    if len(mem) >= 4:
        out.append(Claim("memory-grows", "P1", "memory grows with the batch size",
                         V.correlation([m[0] for m in mem], [m[1] for m in mem]), V.above(0.5),
                         "Spearman rho(batch size, peak memory growth)", {"grid": mem}, primary=False))
    big = [r for r in ok if r["batch_size"] >= 256]
    if len(big) >= 3:
        out.append(Claim("cost-linear-in-m", "K6", "once the hardware is saturated a step costs "
                         "O(m): time per step grows about linearly with the batch",
                         V.slope([math.log(r["batch_size"]) for r in big],
                                 [math.log(r["seconds_per_step"]) for r in big]), V.between(0.7, 1.3),
                         "slope of log(seconds per step) on log(batch size), batch >= 256",
                         {"grid": [(r["batch_size"], r["seconds_per_step"]) for r in big]},
                         reading="the O(m) cost half of K6", primary=False))
    per_sample: dict[int, list[float]] = {}
    for r in pow2:
        if r.get("status") == "ok":
            per_sample.setdefault(r["batch_size"], []).append(r["seconds_per_step"] / r["batch_size"])
    pairs = [(p, q) for p in (256, 1024) for q in (p - 1, p + 1) if p in per_sample and q in per_sample]
    others = [t for _, q in pairs for t in per_sample[q]]
    twos = [t for p, _ in pairs for t in per_sample[p]]
    out.append(Claim("powers-of-two-faster", "P5", "powers of two run faster per sample than "
                     "their neighbours (255/257, 1023/1025)", V.ratio(others, twos), V.above(1.05),
                     "time per sample of the neighbours / of the power of two (5% = a real gain)",
                     {k: float(np.mean(v)) for k, v in per_sample.items()}))
    times = []
    sec = {r["batch_size"]: r["seconds_per_step"] for r in ok}
    for st in seeds.values():
        tt = {bb: n * sec[bb] for bb, n in st.items() if bb in sec}
        if len(tt) >= 3:
            ks = sorted(tt)
            inner = min(tt[k] for k in ks[1:-1])
            times.append(inner / min(tt[ks[0]], tt[ks[-1]]))
    out.append(Claim("time-optimum-interior", "P2", "the batch size minimizing time to target "
                     "lies between the extremes", V.mean_interval(times), V.below(1.0),
                     "best time to target inside the grid / best at its two ends (per seed: "
                     "measured steps x measured seconds per step)", {"ratios": times}))
    return out


def run(ctx: Context) -> Output:
    from batchlab.engine.setup import build_model, get_data, resolve_device
    from batchlab.experiments import steps_to_target as stt

    s = stt.settings(ctx)
    extra = {"hidden": s["hidden"]} if "hidden" in s else {}
    cfg = ctx.config(**extra)
    dev = resolve_device(cfg.device)
    td = get_data(cfg, dev)
    grid = ctx.options.get("batch_sizes") or [2**k for k in range(4, 14)]
    grid = [b for b in grid if b <= td.n_train]
    model = build_model(cfg, td)
    # through the store: timed once per device, model shape, batch size and engine
    tp = measure_stored(model, td.x_train, td.y_train, grid, ctx.store)
    stt_rows, best, _, _ = stt.measure(ctx)
    reached = [r for r in best if r["reached"]]
    steps = {r["batch_size"]: r["steps_to_target"] for r in reached}
    fit = stt.fit_scaling(list(steps), list(steps.values())) if len(steps) >= 2 else None
    rows = time_to_target(tp, steps, fit)
    ok = [r for r in rows if r["status"] == "ok"]
    pow2 = [r for r in measure(model, td.x_train, td.y_train, POW2_PROBE * 3, min_seconds=0.1)
            if r["batch_size"] <= td.n_train]
    claims = throughput_claims(ok, pow2, stt.per_seed_steps(stt_rows, best))
    bst = best_for_time(rows)
    summary = [f"Device {dev}, {torch.get_num_threads()} threads. Timings on a shared machine "
               "are noisy.", "",
               md_table(rows, ["batch_size", "engine", "status", "samples_per_s",
                               "seconds_per_step", "peak_memory_mb", "steps_to_target",
                               "steps_source", "time_to_target_s"])]
    if bst:
        summary.append(f"Fastest to target: **batch {bst['batch_size']}** "
                       f"({bst['time_to_target_s']:.3g} s predicted).")
    oom = [r["batch_size"] for r in rows if r["status"] == "oom"]
    if oom:
        summary.append(f"Out of memory at batch sizes {oom} (recorded, skipped).")
    return Output(rows=rows, summary="\n".join(summary), claims=claims,
                  figures={"throughput.png": figure(rows)})


__all__ = ["best_for_time", "is_oom", "measure", "time_to_target"]

# the same quick-preset MLP as steps-to-target, whose runs (through the store) it reuses
EXPERIMENT = Experiment("throughput", "Throughput, memory and time to target vs batch size", run,
                        quick_options={"hidden": QUICK_HIDDEN})
