"""distance: how far from the initial weights does training go, and does it matter?

A grid of batch sizes x learning rates for E epochs: L2 distance between final and initial
weights (W) and biases (B), and test accuracy (A), per cell — the study's W/B/A table — as a
table and heatmaps. Plus the largest batch at lr 0.01 for (largest/smallest) x E epochs, the
same number of steps as the smallest batch for E epochs, and the distance-vs-epoch curves.

Claims (W = weight distance, the dominant part): better solutions lie farther from the init;
at equal epochs larger batches travel less; a larger lr or more epochs compensates; for a fixed
number of steps the distance travelled is about the same whatever the batch size.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from batchlab.errors import ConfigError
from batchlab.experiments import Claim, Context, Experiment, Output
from batchlab.experiments.outputs import md_table, plt
from batchlab.experiments.study import (
    BASE_LR,
    Group,
    Study,
    claim,
    curves_csv,
    mean,
    nan_float,
    plot_curves,
    pm,
    run_rows,
)
from batchlab.experiments.verdicts_legacy import close_to, combine, correlated, greater, monotone, within

NAME = "distance"
QUICK_GRID = ((64, 128, 256, 512, 1024), (0.01, 0.03, 0.1, 0.3))
TOLERANCE = 0.005  # accuracy: "reaches" = within half a point
LESS_FACTOR = 1.25  # "travels less": at least 25% shorter from the smallest to the largest batch
MIN_RHO = 0.5  # "farther is better": Spearman rho >= 0.5 (and p < 0.05) over the grid cells
DIST_TOL = 0.25  # "bounded for fixed steps": distance ratio within 1 +- 0.25
MORE_FACTOR = 0.10  # "travels farther": at least 10% more than the reference
METRICS = ("test_acc", "train_acc", "dist_init", "dist_init_w", "dist_init_b", "norm_w")


def cell(bs: int, lr: float) -> str:
    return f"bs {bs}, lr {lr:g}"


def run(ctx: Context) -> Output:
    st = Study(ctx, extra_options=("batch_sizes", "lrs", "long_epochs"))
    bss = st.list_option("batch_sizes", QUICK_GRID[0], int)
    lrs = st.list_option("lrs", QUICK_GRID[1], float)
    if len(bss) < 2 or len(lrs) < 2:
        raise ConfigError("distance needs at least two batch sizes and two learning rates")
    small, large = bss[0], bss[-1]
    lr_ref = next((x for x in lrs if math.isclose(x, BASE_LR)), lrs[0])  # the study's lr
    long_e = st.int_option("long_epochs", (large // small) * st.epochs)
    specs = {cell(b, lr): st.spec(b, lr) for b in bss for lr in lrs}
    long_name = f"bs {large}, lr {lr_ref:g}, {long_e} epochs"
    specs[long_name] = st.spec(large, lr_ref, epochs=long_e)
    groups = st.run(specs, label=NAME)

    def grid(metric: str) -> np.ndarray:
        return np.array([[mean(groups[cell(b, lr)].final(metric)) for lr in lrs] for b in bss])

    W, B, A = grid("dist_init_w"), grid("dist_init_b"), grid("test_acc")
    ref = groups[cell(small, lr_ref)]
    same_e = groups[cell(large, lr_ref)]
    long = groups[long_name]
    claims = _claims(groups, bss, lrs, W, A, ref, same_e, long, lr_ref)

    wba = [{"batch size": b, **{f"lr {lr:g}": _wba(W[i, j], B[i, j], A[i, j])
                                for j, lr in enumerate(lrs)}} for i, b in enumerate(bss)]
    steps_tbl = [{"run": g.name, "steps": pm(g.final("steps"), 1, 0),
                  "W distance": pm(g.final("dist_init_w"), 1, 2),
                  "B distance": pm(g.final("dist_init_b"), 1, 3),
                  "test acc (%)": pm(g.final("test_acc"), 100)} for g in (ref, same_e, long)]
    summary = (
        f"Grid of batch sizes {', '.join(map(str, bss))} x learning rates "
        f"{', '.join(f'{x:g}' for x in lrs)}, E = {st.epochs} epochs each; plus batch {large} "
        f"at lr {lr_ref:g} for {long_e} epochs (about the steps of batch {small} x E).\n\n"
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
                  extra_files={"curves.csv": curves_csv(groups, METRICS)})


def _wba(w: float, b: float, a: float) -> str:
    if not all(math.isfinite(v) for v in (w, b, a)):
        return "div."
    return f"{w:.1f}/{b:.2f}/{a * 100:.1f}"


def _claims(groups: dict[str, Group], bss: list[int], lrs: list[float], W: np.ndarray,
            A: np.ndarray, ref: Group, same_e: Group, long: Group, lr_ref: float) -> list[Claim]:
    small, large = bss[0], bss[-1]
    out = [claim("farther-is-better",
                 "better solutions lie farther from the initial weights",
                 correlated(W.ravel(), A.ravel(), positive=True, min_rho=MIN_RHO,
                            what="W distance vs test accuracy across the grid cells"))]

    # at equal epochs, distance falls with batch size, at every lr of the grid
    parts, ev, rule = [], {}, ""
    for j, lr in enumerate(lrs):
        v, e, rule = monotone(bss, np.log(W[:, j]), increasing=False,
                              min_effect=math.log(LESS_FACTOR),
                              what="log W distance vs batch size at each lr")
        parts.append(v)
        ev[f"rho_lr{lr:g}"] = e["spearman_rho"]
        ev[f"ratio_largest_to_smallest_lr{lr:g}"] = math.exp(e["change_first_to_last"]) \
            if math.isfinite(e["change_first_to_last"]) else float("nan")
    out.append(Claim(
        "large-batch-travels-less",
        "at the same number of epochs, larger batches travel less far from the init",
        combine(parts), ev,
        rule + f" (min effect = log {LESS_FACTOR:g}: the largest batch at least "
        f"{LESS_FACTOR:g}x shorter); the claim is reproduced if it is at every lr, not "
        f"reproduced if at any lr it is not, else inconclusive"))

    # a larger lr compensates: largest batch at 10x (or the largest) lr vs the small-batch ref
    big_lr = next((x for x in lrs if math.isclose(x, lr_ref * 10)), lrs[-1])
    fast = groups[cell(large, big_lr)]
    out.append(_compensates("lr-compensates",
                            f"a larger lr ({big_lr:g}) compensates at batch {large}",
                            fast, same_e, ref))
    out.append(_compensates("epochs-compensate",
                            f"more epochs ({len(long.runs[0].epochs) - 1}) compensate at batch "
                            f"{large}", long, same_e, ref))

    # fixed steps: distance ratio long / ref (per seed) close to 1, the long run's curve read
    # at exactly the reference's step count (epochs of different batch sizes do not align)
    ratios = []
    for lr_run, rr in zip(long.runs, ref.runs):
        steps = np.array([nan_float(e.get("steps")) for e in lr_run.epochs])
        dist = np.array([nan_float(e.get("dist_init_w")) for e in lr_run.epochs])
        s_ref = nan_float(rr.epochs[-1].get("steps")) if rr.epochs else float("nan")
        d_ref = nan_float(rr.epochs[-1].get("dist_init_w")) if rr.epochs else float("nan")
        ok = np.isfinite(steps) & np.isfinite(dist)
        if ok.sum() >= 2 and math.isfinite(s_ref) and s_ref <= steps[ok][-1] and d_ref > 0:
            ratios.append(float(np.interp(s_ref, steps[ok], dist[ok])) / d_ref)
        else:
            ratios.append(float("nan"))
    out.append(claim(
        "steps-bound-distance",
        f"for a fixed number of steps the distance travelled is about the same whatever the "
        f"batch size ({large} for {len(long.runs[0].epochs) - 1} epochs vs {small} for "
        f"{len(ref.runs[0].epochs) - 1})",
        within(ratios, 1.0, DIST_TOL,
               f"per-seed ratio of W distances {long.name} (read at the step count of "
               f"{ref.name}, linear interpolation between epochs) / {ref.name}")))
    return out


def _compensates(cid: str, text: str, g: Group, same_e: Group, ref: Group) -> Claim:
    """g reaches ref's accuracy AND travels farther than the same-epochs large-batch run."""
    acc_v, acc_ev, acc_rule = close_to(g.final("test_acc"), ref.final("test_acc"), TOLERANCE,
                                       f"final test accuracy of {g.name} reaches {ref.name}")
    base = mean(same_e.final("dist_init_w"))
    far_v, far_ev, far_rule = greater(g.final("dist_init_w"), same_e.final("dist_init_w"),
                                      MORE_FACTOR * base if math.isfinite(base) else 0.0,
                                      f"W distance of {g.name} > {same_e.name}")
    ev: dict[str, Any] = {f"acc_{k}": v for k, v in acc_ev.items()}
    ev.update({f"dist_{k}": v for k, v in far_ev.items()})
    return Claim(cid, text + ": it travels farther and reaches the small-batch accuracy",
                 combine([acc_v, far_v]), ev,
                 f"both parts must hold — (1) {acc_rule}; (2) {far_rule} (min effect = "
                 f"{MORE_FACTOR:.0%} of the same-epochs distance)")


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


EXPERIMENT = Experiment(NAME, "Distance from the initial weights (W/B/A table)", run,
                        "Batch size x lr grid: distance from init and accuracy.")
