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

import torch

from batchlab.analysis.throughput import (
    MEMORY_LIFETIME,
    best_for_time,
    is_oom,
    measure,
    measure_stored,
    time_to_target,
)
from batchlab.experiments import intervals as I
from batchlab.experiments import verdicts as V
from batchlab.experiments.base import QUICK_HIDDEN, Context, Experiment, Output
from batchlab.experiments.claims import Claim
from batchlab.experiments.intervals import Interval
from batchlab.experiments.outputs import md_table
from batchlab.experiments.work import Results, Work


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
TIMED_BY_SEED = "one timing pass of the grid per seed (a replicate)"

Timings = dict[int, list[dict[str, Any]]]


def _ok(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in rows if r.get("status") == "ok"]


def memory_interval(tp: Timings) -> Interval:
    """P1's memory half: Kendall tau(batch size, peak memory) per timing pass, or no estimate
    (`unmeasured`) with the reason when peak memory could not be measured on this device."""
    methods = {r.get("memory_method") for rows in tp.values() for r in _ok(rows)}
    if not methods or None in methods or MEMORY_LIFETIME in methods:
        return I.nan_interval("peak memory not measured: " + (
            "the process's peak RSS cannot be reset here, so a batch size below an earlier "
            "peak reads 0" if MEMORY_LIFETIME in methods else "no memory record in the timings"))
    series = [([r["batch_size"] for r in _ok(rows)],
               [r.get("peak_memory_mb") or 0.0 for r in _ok(rows)]) for rows in tp.values()]
    if all(max(y, default=0.0) <= 0 for _, y in series):
        return I.nan_interval("peak memory not measured: 0 MB growth at every batch size (the "
                              "allocator served every step from memory it already held)")
    return I.correlation(series, "Kendall tau(batch size, peak memory)")


def throughput_claims(tp: Timings, pow2: Timings,
                      best: dict[int, dict[int, dict[str, Any]]]) -> list[Claim]:
    """P1 (throughput and memory grow with the batch), P2 (a time-optimal batch size between
    the extremes), P5 (powers of two faster), K6's cost half (a step's time grows ~ linearly
    in m once the hardware is saturated). `tp` / `pow2`: one timing pass per seed (seed ->
    rows); `best`: steps-to-target's per-seed fastest lr per batch size (`per_seed_best`).
    Every quantity is computed inside one seed - its timing pass, its steps - and the interval
    is over seeds, so timing noise is in it."""
    out = [Claim("throughput-grows", "P1", "samples/s grow with the batch size",
                 I.correlation([([r["batch_size"] for r in _ok(rows)],
                                 [r["samples_per_s"] for r in _ok(rows)]) for rows in tp.values()],
                               "Kendall tau(batch size, samples/s)"), V.above(0.5),
                 f"Kendall tau(batch size, samples/s) over the grid, {TIMED_BY_SEED}",
                 {"grid": {sd: [(r["batch_size"], r["samples_per_s"]) for r in _ok(rows)]
                           for sd, rows in tp.items()}}, primary=True)]
    out.append(Claim("memory-grows", "P1", "memory grows with the batch size", memory_interval(tp),
                     V.above(0.5), f"Kendall tau(batch size, peak memory), {TIMED_BY_SEED}",
                     {"grid": {sd: [(r["batch_size"], r.get("peak_memory_mb")) for r in _ok(rows)]
                               for sd, rows in tp.items()},
                      "memory_method": sorted({str(r.get("memory_method")) for rows in tp.values()
                                               for r in _ok(rows)})}, primary=True))
    big = [([math.log(r["batch_size"]) for r in _ok(rows) if r["batch_size"] >= 256],
            [math.log(r["seconds_per_step"]) for r in _ok(rows) if r["batch_size"] >= 256])
           for rows in tp.values()]
    big = [(x, y) for x, y in big if len(x) >= 3]
    if big:
        out.append(Claim("cost-linear-in-m", "K6", "once the hardware is saturated a step costs "
                         "O(m): time per step grows about linearly with the batch",
                         I.slope(big, "slopes of log s/step on log batch"), V.between(0.7, 1.3),
                         f"slope of log(seconds per step) on log(batch size), batch >= 256, "
                         f"{TIMED_BY_SEED}", {"grid": big},
                         reading="the O(m) cost half of K6", primary=True))
    out.append(powers_of_two_claim(pow2))
    out.append(time_optimum_claim(tp, best))
    return out


def powers_of_two_claim(pow2: Timings) -> Claim:
    """P5: for each power p in (256, 1024), per seed the log of (mean per-sample time of p - 1
    and p + 1) / (per-sample time of p), all timed in the same pass; one interval per p over
    seeds, and the claim needs both (`all_of`: the weaker part decides)."""
    parts, logs = [], {}
    for p in (256, 1024):
        per = []
        for rows in pow2.values():
            t = {r["batch_size"]: r["seconds_per_step"] / r["batch_size"] for r in _ok(rows)}
            if {p - 1, p, p + 1} <= set(t):
                per.append(math.log((t[p - 1] + t[p + 1]) / 2 / t[p]))
        logs[p] = per
        if per:
            parts.append(I.replicate_mean(per, what=f"log time ratios around {p}").map(
                math.exp, f"exp of a t interval over seeds of log(neighbours / {p})"))
    if not parts:
        iv = I.nan_interval("the probe's batch sizes exceed the training set")
    else:
        iv = I.all_of(parts, "powers of two") if len(parts) == 2 else parts[0]
    return Claim("powers-of-two-faster", "P5", "powers of two run faster per sample than their "
                 "neighbours (255/257, 1023/1025)", iv, V.above(1.05),
                 "time per sample of the neighbours / of the power of two (5% = a real gain), "
                 "each pair per seed, both pairs needed", {"log_ratios": logs}, primary=True)


def time_optimum_claim(tp: Timings, best: dict[int, dict[int, dict[str, Any]]]) -> Claim:
    """P2: per seed, the best time to target inside the grid / the best at its two ends
    (that seed's steps at its fastest lr x that seed's timing of seconds per step). An end
    that missed the target enters with its budget's time, a lower bound on
    its true time: the ratio is then an upper bound, still valid evidence for 'below 1'.
    A reached step count is exact here even when the fits call it censored (late in the
    budget): censoring biases a fit's curve, not one measured time."""
    logs, bounds = [], []
    for sd, arms in best.items():
        sec = {r["batch_size"]: r["seconds_per_step"] for r in _ok(tp.get(sd, []))}
        ks = sorted(b for b in arms if b in sec)
        if len(ks) < 3:
            continue
        inner = [arms[b]["steps"] * sec[b] for b in ks[1:-1] if arms[b]["steps"] is not None]
        ends = [(arms[b]["budget"] if arms[b]["steps"] is None else arms[b]["steps"]) * sec[b]
                for b in (ks[0], ks[-1])]
        if inner and min(ends) > 0:
            logs.append(math.log(min(inner) / min(ends)))
            bounds.append([b for b in (ks[0], ks[-1]) if arms[b]["steps"] is None])
    iv = I.replicate_mean(logs, what="log time ratios").map(
        math.exp, "exp of a t interval over seeds of log(best inner / best end time)")
    return Claim("time-optimum-interior", "P2", "the batch size minimizing time to target lies "
                 "between the extremes", iv, V.below(1.0),
                 "best time to target inside the grid / best at its two ends, per seed (its "
                 f"measured steps x its own timing pass; {TIMED_BY_SEED})",
                 {"log_ratios": logs, "ends_at_budget_bound": bounds}, primary=True)


def units(ctx: Context) -> Work:
    """Timings on this device (their result is the timing: a projection of it means nothing),
    and steps-to-target's runs, which it reuses through the store."""
    return Work("throughput", timed="measures on this device itself: not projected")


def analyze(ctx: Context, results: Results) -> Output:
    from batchlab.engine.setup import build_model, get_data, resolve_device
    from batchlab.experiments import steps_to_target as stt

    cfg = ctx.config()  # the grid's model: hidden widths come from the options, as in stt's
    dev = resolve_device(cfg.device)
    td = get_data(cfg, dev)
    grid = ctx.options.get("batch_sizes") or [2**k for k in range(4, 14)]
    grid = [b for b in grid if b <= td.n_train]
    model = build_model(cfg, td)
    # through the store: one timing pass per seed (device, model shape, batch size, engine)
    tp = {seed: measure_stored(model, td.x_train, td.y_train, grid, ctx.store, replicate=seed)
          for seed in ctx.seed_list}
    stt_rows, best, _, _ = stt.measure(ctx)
    reached = [r for r in best if r["reached"]]
    steps = {r["batch_size"]: r["steps_to_target"] for r in reached}
    fit = stt.fit_scaling(list(steps), list(steps.values())) if len(steps) >= 2 else None
    rows = time_to_target(tp[ctx.seed_list[0]], steps, fit)
    probe = [b for b in POW2_PROBE if b <= td.n_train]
    pow2 = {seed: measure(model, td.x_train, td.y_train, probe, min_seconds=0.1)
            for seed in ctx.seed_list} if probe else {}
    claims = throughput_claims(tp, pow2, stt.per_seed_best(stt_rows))
    bst = best_for_time(rows)
    summary = [f"Device {dev}, {torch.get_num_threads()} threads. Timings on a shared machine "
               f"are noisy: the grid is timed once per seed ({len(tp)} passes) and the claims' "
               "intervals are over those passes; the table shows the first.", "",
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
EXPERIMENT = Experiment("throughput", "Throughput, memory and time to target vs batch size", units,
                        analyze,
                        quick_options={"hidden": QUICK_HIDDEN})
