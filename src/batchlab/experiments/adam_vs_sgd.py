"""adam-vs-sgd: where in weight space do Adam and SGD end up?

Adam (lr 0.01, batch 64) beside SGD (lr 0.01, batch 64; the same run as batch-size's
reference): distance from init and from the origin (W and B), per-layer cosine similarity
between initial and final weights, and the distance-from-init vs epoch curve.

The curve's shape is summarised by the exponent alpha of a least-squares fit
log d(t) = alpha log t + c over epochs 1..E (alpha = 1: linear, 0.5: square-root growth) and by
d(E/2) / d(E) (0.5 for linear growth, 0.71 for square-root growth).
"""

from __future__ import annotations

import math
import re
from typing import Any

import numpy as np

from batchlab.experiments import Context, Experiment, Output
from batchlab.experiments.outputs import md_table, plt
from batchlab.experiments.study import (
    ACC_METRICS,
    BASE_LR,
    Group,
    Study,
    accuracy_figure,
    claim,
    curves_csv,
    mean,
    nan_float,
    plot_curves,
    pm,
    run_rows,
)
from batchlab.experiments.verdicts_legacy import combine, greater, within

NAME = "adam-vs-sgd"
NORM_RATIO_EFFECT = 1.0  # "far larger": Adam's final/init norm ratio exceeds SGD's by >= 1
COS_EFFECT = 0.2  # "ignores the init": Adam's mean layer cosine below SGD's by >= 0.2
SPHERE_TOL = 0.1  # "near its initial sphere": norm ratio within 1 +- 0.1, cosine >= 0.9
ALPHA_EFFECT = 0.2  # "near-linear vs sublinear": alpha(Adam) - alpha(SGD) >= 0.2
METRICS = ("test_acc", "train_acc", "dist_init_w", "dist_init_b", "norm_w", "norm_b")


def layers(g: Group) -> list[str]:
    """Layer names (layer1..layerN) present in the geometry probe's metrics."""
    keys = g.runs[0].epochs[0] if g.runs and g.runs[0].epochs else {}
    found = sorted({m.group(1) for k in keys if (m := re.fullmatch(r"cos_init_(layer\d+)", k))},
                   key=lambda s: int(s[5:]))
    return found


def norm_ratio(g: Group, key: str = "norm_w") -> list[float]:
    """Final norm / initial norm, per seed."""
    return [f / i if i > 0 else float("nan") for f, i in zip(g.final(key), g.at_epoch(key, 0))]


def mean_layer_cos(g: Group) -> list[float]:
    """Mean over Linear layers of cos(initial, final weights), per seed."""
    per_layer = np.array([g.final(f"cos_init_{ln}") for ln in layers(g)])
    return per_layer.mean(axis=0).tolist() if per_layer.size else [float("nan")] * len(g.runs)


def growth(g: Group) -> tuple[list[float], list[float]]:
    """(alpha, d(E/2)/d(E)) per seed from the distance-from-init curve (see module doc)."""
    alphas, halves = [], []
    for r in g.runs:
        ep = np.array([nan_float(e.get("epoch")) for e in r.epochs[1:]])
        d = np.array([nan_float(e.get("dist_init")) for e in r.epochs[1:]])
        ok = np.isfinite(d) & (d > 0)
        if ok.sum() >= 2 and r.status == "completed":
            alphas.append(float(np.polyfit(np.log(ep[ok]), np.log(d[ok]), 1)[0]))
            e_end = int(ep[-1])
            half = next((dv for ev, dv in zip(ep, d) if ev == max(1, e_end // 2)), float("nan"))
            halves.append(float(half / d[-1]))
        else:
            alphas.append(float("nan"))
            halves.append(float("nan"))
    return alphas, halves


def run(ctx: Context) -> Output:
    st = Study(ctx, extra_options=("batch_size", "adam_lr"))
    bs = st.int_option("batch_size", 64)
    adam_lr = float(st.opts.get("adam_lr", BASE_LR))
    sgd_name, adam_name = f"SGD (lr {BASE_LR:g}, bs {bs})", f"Adam (lr {adam_lr:g}, bs {bs})"
    groups = st.run({sgd_name: st.spec(bs),
                     adam_name: st.spec(bs, adam_lr, optimizer="adam")}, label=NAME)
    sgd, adam = groups[sgd_name], groups[adam_name]
    lnames = layers(sgd)

    table, layer_tbl = [], []
    for g in (sgd, adam):
        alpha, half = growth(g)
        table.append({
            "optimizer": g.name, "test acc (%)": pm(g.final("test_acc"), 100),
            "W dist. from init": pm(g.final("dist_init_w"), 1, 2),
            "B dist. from init": pm(g.final("dist_init_b"), 1, 3),
            "W norm init": pm(g.at_epoch("norm_w", 0), 1, 2),
            "W norm final": pm(g.final("norm_w"), 1, 2),
            "B norm final": pm(g.final("norm_b"), 1, 3),
            "W norm ratio": pm(norm_ratio(g), 1, 3),
            "mean layer cos": pm(mean_layer_cos(g), 1, 3),
            "alpha": pm(alpha, 1, 2), "d(E/2)/d(E)": pm(half, 1, 3),
        })
        for ln in lnames:
            layer_tbl.append({
                "optimizer": g.name, "layer": ln,
                "cos(init, final)": pm(g.final(f"cos_init_{ln}"), 1, 4),
                "norm init": pm(g.at_epoch(f"norm_{ln}_w", 0), 1, 2),
                "norm final": pm(g.final(f"norm_{ln}_w"), 1, 2),
                "dist. from init": pm(g.final(f"dist_init_{ln}_w"), 1, 2),
            })

    (a_alpha, _), (s_alpha, _) = growth(adam), growth(sgd)
    ratio_v = within(norm_ratio(sgd), 1.0, SPHERE_TOL, "SGD final/initial W norm ratio")
    cos_v = within(mean_layer_cos(sgd), 1.0, SPHERE_TOL, "SGD mean layer cosine(init, final)")
    claims = [
        claim("adam-larger-weights", "Adam finds far larger weights than SGD",
              greater(norm_ratio(adam), norm_ratio(sgd), NORM_RATIO_EFFECT,
                      "final/initial W norm ratio of Adam > SGD's")),
        claim("adam-ignores-init", "Adam ignores the initialization (its final weights are "
              "far less aligned with the initial ones than SGD's)",
              greater(mean_layer_cos(sgd), mean_layer_cos(adam), COS_EFFECT,
                      "mean per-layer cosine(init, final) of SGD > Adam's")),
        claim("sgd-on-sphere", "SGD mostly moves the weights along the sphere of their initial "
              "radius (final norm close to initial norm, cosine close to 1)",
              (combine([ratio_v[0], cos_v[0]]),
               {**{f"ratio_{k}": v for k, v in ratio_v[1].items()},
                **{f"cos_{k}": v for k, v in cos_v[1].items()}},
               f"both must hold — (1) {ratio_v[2]}; (2) {cos_v[2]}")),
        claim("adam-linear-sgd-sublinear", "Adam's distance from init grows near-linearly with "
              "epochs, SGD's sublinearly",
              greater(a_alpha, s_alpha, ALPHA_EFFECT,
                      "growth exponent alpha (fit of log distance on log epoch, epochs 1..E) "
                      "of Adam > SGD's")),
    ]
    summary = (f"Adam and SGD at lr {BASE_LR:g} (Adam: {adam_lr:g}), batch {bs}, E = "
               f"{st.epochs} epochs. Distances and norms are L2 over all weights (W) or all "
               f"biases (B).\n\n" + st.header([sgd, adam])
               + "\n## Geometry after epoch E\n\n" + md_table(table)
               + "\nalpha: exponent of the fit log d(t) = alpha log t + c over epochs 1..E "
               "(1 = linear growth, 0.5 = square-root); d(E/2)/d(E): 0.5 for linear growth, "
               "0.71 for square-root growth.\n\n## Per layer (weights)\n\n" + md_table(layer_tbl))
    figures = {"distance_curves.png": _distance_figure(sgd, adam),
               "layer_geometry.png": _layer_figure(sgd, adam, lnames),
               "accuracy_curves.png": accuracy_figure([sgd, adam], "Adam vs SGD")}
    rows = run_rows(groups, METRICS + tuple(f"cos_init_{ln}" for ln in lnames))
    return Output(rows=rows, summary=summary, claims=claims, figures=figures,
                  extra_files={"curves.csv": curves_csv(groups, (*ACC_METRICS, "dist_init",
                                                                 "norm_w", "norm_b"))})


def _distance_figure(sgd: Group, adam: Group) -> Any:
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(12, 4.5))
    plot_curves(ax, [sgd, adam], "dist_init")
    ax.set(title="Distance from init vs epoch", xlabel="epoch",
           ylabel="L2 distance from init (W and B, log scale)")
    ax.set_yscale("log", nonpositive="mask")  # epoch 0 (distance 0) has no place on a log axis
    for i, g in enumerate((sgd, adam)):
        xs, m, _ = g.curve("dist_init")
        end = m[-1] if len(m) and math.isfinite(m[-1]) and m[-1] > 0 else float("nan")
        bx.plot(xs, m / end, color=f"C{i}", label=g.name)
    if len(xs):
        t = np.linspace(0, xs[-1], 100)
        bx.plot(t, t / xs[-1], "k:", label="linear")
        bx.plot(t, np.sqrt(t / xs[-1]), "k--", alpha=0.6, label="square root")
    bx.set(title="Shape: distance / final distance", xlabel="epoch",
           ylabel="d(t) / d(E)")
    for a in (ax, bx):
        a.grid(alpha=0.3)
        a.legend(fontsize=8)
    fig.tight_layout()
    return fig


def _layer_figure(sgd: Group, adam: Group, lnames: list[str]) -> Any:
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(12, 4.2))
    x = np.arange(len(lnames))
    for i, g in enumerate((sgd, adam)):
        cos = [mean(g.final(f"cos_init_{ln}")) for ln in lnames]
        ratio = [mean(norm_ratio(g, f"norm_{ln}_w")) for ln in lnames]
        bars = ax.bar(x + (i - 0.5) * 0.38, cos, 0.38, label=g.name, color=f"C{i}")
        ax.bar_label(bars, fmt="%.3f", fontsize=8)
        bars = bx.bar(x + (i - 0.5) * 0.38, ratio, 0.38, label=g.name, color=f"C{i}")
        bx.bar_label(bars, fmt="%.2f", fontsize=8)
    ax.set(title="Cosine(initial, final weights) per layer", ylabel="cosine", ylim=(0, 1.3))
    bx.set(title="Final / initial weight norm per layer", ylabel="norm ratio")
    bx.set_ylim(0, bx.get_ylim()[1] * 1.25)  # headroom for the legend
    bx.axhline(1.0, color="k", lw=0.8, ls=":")
    for a in (ax, bx):
        a.set_xticks(x, lnames)
        a.set_xlabel("Linear layer")
        a.legend(fontsize=8, loc="upper center", ncol=2)
        a.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    return fig


EXPERIMENT = Experiment(NAME, "Adam vs SGD: weight geometry", run,
                        "Distance from init/origin and per-layer cosines, Adam vs SGD.")
