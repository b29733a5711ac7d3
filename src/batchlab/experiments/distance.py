"""distance: how far from the initial weights does training go, and does it matter?

A grid of batch sizes x learning rates for E epochs: L2 distance between final and initial
weights (W) and biases (B), and test accuracy (A), per cell — the study's W/B/A table — as a
table and heatmaps. Plus the largest batch at lr 0.01 for (largest/smallest) x E epochs, the
same number of steps as the smallest batch for E epochs, and the distance-vs-epoch curves.

Claims (W = weight distance, the dominant part):
- S9 (primary both): better solutions lie farther from the init (Kendall tau of W vs test
  accuracy over the grid's cells, one tau per seed, interval over seeds, above MIN_TAU); at
  equal epochs and the study's lr the largest batch travels less than the smallest (geometric
  mean of the per-seed ratios of W below 1).
- S10 (primary: accuracy): a larger lr, or as many steps as the small batch (more epochs),
  brings the large batch to the small batch's accuracy (difference within +-ACC_TOL, paired by
  seed on the shared test set, gated on both arms having converged); secondary: it also
  travels farther than the large batch at equal epochs.
- S11 (primary both): for a fixed number of steps the distance travelled is about the same
  whatever the batch size (ratio of W at equal steps within [0.8, 1.25]); the distance grows
  sublinearly with epochs under SGD (growth exponent below 1: one slope of log W on log epoch
  per seed; the long run's exponent is secondary).

n is always the number of training seeds: the grid's cells and a run's epochs are summarised
inside a seed (a tau, a slope) before the interval is taken over seeds.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from batchlab.errors import ConfigError
from batchlab.experiments.base import Context, Experiment, Output
from batchlab.experiments.claims import Claim
from batchlab.experiments.intervals import correlation, ratio
from batchlab.experiments.outputs import md_table, plt
from batchlab.experiments.study import (
    ACC_TOL,
    BASE_LR,
    Group,
    Study,
    acc_difference,
    converged_all,
    curves_csv,
    mean,
    nan_float,
    per_seed,
    pm,
    run_rows,
)
from batchlab.experiments.study_figures import plot_curves
from batchlab.experiments.study_geometry import distance_numbers, growth_slope
from batchlab.experiments.verdicts import above, below, between
from batchlab.experiments.work import Results, Work

NAME = "distance"
MIN_TAU = 0.35
""""Farther is better": Kendall tau of W vs accuracy above 0.35 - the tau of a Spearman rho of
0.5 (the earlier threshold) under a bivariate normal, tau = (2/pi) arcsin(2 sin(pi rho / 6))."""
SAME_BAND = (0.8, 1.25)  # "about the same distance": ratio within [0.8, 1.25]
METRICS = ("test_acc", "train_acc", "dist_init", "dist_init_w", "dist_init_b", "norm_w")


def cell(bs: int, lr: float) -> str:
    return f"bs {bs}, lr {lr:g}"


def units(ctx: Context) -> Work:
    """The batch size x lr grid and the large batch's steps-matched long run, every seed."""
    st = Study(ctx)
    bss, lrs = st.distinct(st.opts.batch_sizes), st.distinct(st.opts.lrs)
    if len(bss) < 2 or len(lrs) < 2:
        raise ConfigError("distance needs at least two batch sizes and two learning rates")
    large = bss[-1]
    lr_ref = next((x for x in lrs if math.isclose(x, BASE_LR)), lrs[0])  # the study's lr
    long_e = st.opts.long_epochs  # default: steps-matched, (large // small) x E
    specs = {cell(b, lr): st.spec(b, lr) for b in bss for lr in lrs}
    long_name = f"bs {large}, lr {lr_ref:g}, {long_e} epochs"
    # evaluated every long_e / E epochs: the reference's number of points (and the same last
    # fifth for the plateau gate) at a fraction of the evaluation cost; distances (probes) and
    # the final metrics are per epoch and exact as before
    specs[long_name] = st.spec(large, lr_ref, epochs=long_e, eval_every=max(1, long_e // st.epochs))
    return st.work(specs, NAME, bss=bss, lrs=lrs, lr_ref=lr_ref, long_e=long_e,
                   long_name=long_name)


def analyze(ctx: Context, results: Results) -> Output:
    st = Study(ctx)
    bss, lrs, lr_ref, long_e, long_name = (results.state[k] for k in (
        "bss", "lrs", "lr_ref", "long_e", "long_name"))
    small, large = bss[0], bss[-1]
    groups = st.groups(results)

    def grid(metric: str) -> np.ndarray:
        return np.array([[mean(groups[cell(b, lr)].final(metric)) for lr in lrs] for b in bss])

    W, B, A = grid("dist_init_w"), grid("dist_init_b"), grid("test_acc")
    ref = groups[cell(small, lr_ref)]
    same_e = groups[cell(large, lr_ref)]
    long = groups[long_name]
    big_lr = next((x for x in lrs if math.isclose(x, lr_ref * 10)), lrs[-1])
    fast = groups[cell(large, big_lr)]
    _, n_test = st.sizes(groups.values())
    claims = _claims(groups, bss, lrs, ref, same_e, long, fast, n_test)
    numbers = distance_numbers(st, groups, [cell(b, lr) for b in bss for lr in lrs], ref, same_e,
                            fast, long, n_test)

    wba = [{"batch size": b, **{f"lr {lr:g}": _wba(W[i, j], B[i, j], A[i, j])
                                for j, lr in enumerate(lrs)}} for i, b in enumerate(bss)]
    steps_tbl = [{"run": g.name, "steps": pm(g.final("steps"), 1, 0),
                  "W distance": pm(g.final("dist_init_w"), 1, 2),
                  "B distance": pm(g.final("dist_init_b"), 1, 3),
                  "test acc (%)": pm(g.final("test_acc"), 100)} for g in (ref, same_e, long)]
    summary = (
        f"Grid of batch sizes {', '.join(map(str, bss))} x learning rates "
        f"{', '.join(f'{x:g}' for x in lrs)}, E = {st.epochs} epochs each; plus batch {large} "
        f"at lr {lr_ref:g} for {long_e} epochs (about the steps of batch {small} x E)."
        + ("" if large == 1024 else f" Batch {large} stands in for the study's 1024 (the "
           f"quick preset's grid keeps the steps-matched long run affordable); its rows of "
           f"study_numbers.csv say so.") + "\n\n"
        + st.header(groups.values())
        + "\n## W/B/A per cell (rows: batch size, columns: lr)\n\n"
        "W = L2 distance of the weights from their init, B = same for the biases, "
        "A = final test accuracy (%); means over seeds (per-seed values in results.csv); "
        "'div.' = the run diverged.\n\n" + md_table(wba)
        + "\n## Same number of steps\n\n" + md_table(steps_tbl)
    )
    figures = {"wba_heatmap.png": _heatmaps(bss, lrs, W, B, A),
               "distance_curves.png": _curves(groups, bss, lr_ref, ref, same_e, long)}
    cols = {cell(b, lr): {"batch_size": b, "lr": lr} for b in bss for lr in lrs}
    cols[long_name] = {"batch_size": large, "lr": lr_ref}
    rows = run_rows(groups, METRICS, **cols)
    return Output(rows=rows, summary=summary, claims=claims, figures=figures,
                  study_numbers=numbers, extra_files={"curves.csv": curves_csv(groups, METRICS)})


def _wba(w: float, b: float, a: float) -> str:
    if not all(math.isfinite(v) for v in (w, b, a)):
        return "div."
    return f"{w:.1f}/{b:.2f}/{a * 100:.1f}"


def _claims(groups: dict[str, Group], bss: list[int], lrs: list[float], ref: Group,
            same_e: Group, long: Group, fast: Group, n_test: int) -> list[Claim]:
    small, large = bss[0], bss[-1]
    grid = [groups[cell(b, lr)] for b in bss for lr in lrs]
    w = [g.final("dist_init_w") for g in grid]
    a = [g.final("test_acc") for g in grid]
    seeds = min(len(g.runs) for g in grid)
    series = [([ws[s] for ws in w], [acc[s] for acc in a]) for s in range(seeds)]
    w_small, w_large = ref.final("dist_init_w"), same_e.final("dist_init_w")
    out = [
        Claim("farther-is-better", "S9", "better solutions lie farther from the initial weights",
              correlation(series), above(MIN_TAU),
              "Kendall tau of W distance vs final test accuracy over the grid's cells, one per "
              "seed", {"cells": [g.name for g in grid], "W": w, "test_acc": a}, primary=True),
        Claim("large-batch-travels-less", "S9",
              f"at the same number of epochs (lr {ref.runs[0].config.lr:g}), batch {large} "
              f"travels less far from the init than batch {small}",
              ratio(w_large, w_small), below(1.0), f"W distance of {same_e.name} / {ref.name}",
              per_seed(**{f"W {same_e.name}": w_large, f"W {ref.name}": w_small}), primary=True),
    ]
    for cid, g, how in (("lr-compensates", fast, f"a larger lr ({fast.runs[0].config.lr:g})"),
                        ("epochs-compensate", long,
                         f"more epochs ({len(long.runs[0].epochs) - 1}, the steps of batch "
                         f"{small})")):
        ev = per_seed(**{f"test_acc {g.name}": g.final("test_acc"),
                         f"test_acc {ref.name}": ref.final("test_acc"),
                         f"W {g.name}": g.final("dist_init_w"), f"W {same_e.name}": w_large})
        out.append(Claim(cid, "S10", f"{how} brings batch {large} to the accuracy of batch {small}",
                         acc_difference(g, ref, n_test), between(-ACC_TOL, ACC_TOL),
                         f"test accuracy of {g.name} minus {ref.name}", ev,
                         reading=f"compensates = the same accuracy within +-{ACC_TOL:g}",
                         primary=True, gates=converged_all(g, ref)))
        out.append(Claim(cid.replace("compensate", "travel") + "-farther", "S10",
                         f"{how} makes batch {large} travel farther than at equal epochs",
                         ratio(g.final("dist_init_w"), w_large), above(1.0),
                         f"W distance of {g.name} / {same_e.name}", ev,
                         reading="compensates = the distance it did not travel", primary=False))

    at_steps = [_distance_at_steps(lr_run, rr) for lr_run, rr in zip(long.runs, ref.runs)]
    out.append(Claim(
        "steps-bound-distance", "S11",
        f"for a fixed number of steps the distance travelled is about the same whatever the "
        f"batch size ({large} for {len(long.runs[0].epochs) - 1} epochs vs {small} for "
        f"{len(ref.runs[0].epochs) - 1})",
        ratio(at_steps, w_small), between(*SAME_BAND),
        f"W distance of {long.name} read at the step count of {ref.name} (linear interpolation "
        f"between epochs) / W of {ref.name}",
        per_seed(**{"W long at equal steps": at_steps, f"W {ref.name}": w_small}), primary=True))
    for g, prim in ((ref, True), (long, False)):
        out.append(Claim(
            "sgd-sublinear" + ("" if prim else "-long"), "S11",
            f"under SGD the distance from init grows sublinearly with epochs ({g.name})",
            growth_slope(g), below(1.0),
            f"slope of log W distance on log epoch (epochs 1..end), one per seed, of {g.name}",
            {"runs": len(g.runs)}, primary=prim))
    return out


def _distance_at_steps(long_run: Any, ref_run: Any) -> float:
    """W of the long run at exactly the reference's step count (epochs of different batch
    sizes do not align; linear interpolation between epochs)."""
    steps = np.array([nan_float(e.get("steps")) for e in long_run.epochs])
    dist = np.array([nan_float(e.get("dist_init_w")) for e in long_run.epochs])
    s_ref = nan_float(ref_run.epochs[-1].get("steps")) if ref_run.epochs else float("nan")
    ok = np.isfinite(steps) & np.isfinite(dist)
    if ok.sum() >= 2 and math.isfinite(s_ref) and s_ref <= steps[ok][-1]:
        return float(np.interp(s_ref, steps[ok], dist[ok]))
    return float("nan")


def _heatmaps(bss: list[int], lrs: list[float], W: np.ndarray, B: np.ndarray,
              A: np.ndarray) -> Any:
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.6))
    panels = [(W, "W: weight distance from init", "{:.1f}", "viridis"),
              (B, "B: bias distance from init", "{:.2f}", "viridis"),
              (A * 100, "A: final test accuracy (%)", "{:.1f}", "magma")]
    for ax, (m, title, fmt, cmap) in zip(axes, panels):
        im = ax.imshow(np.ma.masked_invalid(m), cmap=cmap, aspect="auto")
        fig.colorbar(im, ax=ax, shrink=0.85)
        finite = m[np.isfinite(m)]
        mid = (finite.min() + finite.max()) / 2 if finite.size else 0
        for i in range(m.shape[0]):
            for j in range(m.shape[1]):
                v = m[i, j]
                txt = fmt.format(v) if math.isfinite(v) else "div."
                ax.text(j, i, txt, ha="center", va="center", fontsize=9,
                        color="white" if not math.isfinite(v) or v < mid else "black")
        ax.set_xticks(range(len(lrs)), [f"{x:g}" for x in lrs])
        ax.set_yticks(range(len(bss)), [str(b) for b in bss])
        ax.set(title=title, xlabel="learning rate", ylabel="batch size")
    fig.suptitle("Distance from init and test accuracy per (batch size, lr) cell")
    fig.tight_layout()
    return fig


def _curves(groups: dict[str, Group], bss: list[int], lr_ref: float, ref: Group,
            same_e: Group, long: Group) -> Any:
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(12, 4.5))
    plot_curves(ax, [groups[cell(b, lr_ref)] for b in bss], "dist_init")
    ax.set(title=f"Distance from init vs epoch (lr {lr_ref:g})", xlabel="epoch",
           ylabel="L2 distance from init (W and B)")
    ax.legend(fontsize=8)
    plot_curves(bx, [ref, same_e, long], "dist_init", x="steps")
    bx.set(title="Distance from init vs optimizer steps", xlabel="optimizer steps",
           ylabel="L2 distance from init (W and B)")
    bx.legend(fontsize=8)
    for a in (ax, bx):
        a.grid(alpha=0.3)
    fig.tight_layout()
    return fig


EXPERIMENT = Experiment(NAME, "Distance from the initial weights (W/B/A table)", units, analyze,
                        "Batch size x lr grid: distance from init and accuracy.")
