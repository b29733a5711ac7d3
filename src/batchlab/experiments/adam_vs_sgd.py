"""adam-vs-sgd: where in weight space do Adam and SGD end up?

Adam (lr 0.01, batch 64) beside SGD (lr 0.01, batch 64; the same run as batch-size's
reference): distance from init and from the origin (W and B), per-layer cosine similarity
between initial and final weights, and the distance-from-init vs epoch curve.

Claims:
- S12 (primary, every part of the source's claim): Adam generalizes worse (SGD's test accuracy
  minus Adam's above 0, paired by seed on the shared test set, gated on both optimizers having
  converged: an undertrained SGD run would make Adam "win" for the wrong reason), finds much
  larger weights (Adam's weight norm over SGD's above 2; the study: 258 / 44.9 = 5.7) and its
  distance grows almost linearly with epochs (growth exponent in [0.8, 1.2]); secondary: it
  travels much farther from init (ratio above 2).
- S13 (primary): SGD stays near the sphere of its initial radius and Adam ignores the
  initialization (its mean per-layer cosine(init, final) below 0.5; the study: 0.12-0.36);
  secondary: SGD's cosine stays above 0.9. "Near the sphere" is read two ways; (2) is the
  primary reading, because (1) often cannot fail at the budget run. (1) The relative
  change of the weight norm within +-SPHERE_TOL: by the triangle inequality ||w| - |w0|| <= d
  (the distance travelled), so while every seed's d / |w0| is below SPHERE_TOL the band cannot
  be left whatever the direction of travel; the claim is then a check (`construction`), not
  evidence. (2) The displacement runs along the sphere, not off it: the radial share
  (|w| - |w0|) / d, which can be anywhere in [-1, 1] at any d, within +-RADIAL_MAX (a random
  direction gives about d / 2|w0|; the study's Adam: (258 - 44) / 254 = 0.84).
- S14 (primary): under SGD the second layer changes least: its cosine(init, final) exceeds every
  other layer's (each difference above 0; the weakest decides).

The growth exponent alpha is the least-squares slope of log d(t) on log t over epochs 1..E,
one per seed, with a t interval over seeds (alpha = 1: linear, 0.5: square-root growth). Every
interval's n is the number of training seeds; ratios are geometric means of per-seed ratios.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from batchlab.experiments.base import Context, Experiment, Output
from batchlab.experiments.claims import Claim
from batchlab.experiments.intervals import (
    Interval,
    all_of,
    difference,
    nan_interval,
    ratio,
)
from batchlab.experiments.outputs import md_table, plt
from batchlab.experiments.study import (
    ACC_METRICS,
    BASE_LR,
    SET_64,
    SET_ADAM,
    Group,
    Study,
    acc_difference,
    acc_interval,
    converged_all,
    curves_csv,
    mean,
    per_seed,
    pm,
    run_rows,
    value_interval,
)
from batchlab.experiments.study_figures import accuracy_figure, plot_curves
from batchlab.experiments.study_geometry import (
    geometry_numbers,
    growth_slope,
    layers,
    mean_layer_cos,
    norm_change,
)
from batchlab.experiments.verdicts import above, below, between, within
from batchlab.experiments.work import Results, Work

NAME = "adam-vs-sgd"
MUCH_LARGER = 2.0  # "much larger": at least twice SGD's
SPHERE_TOL = 0.1  # "near the sphere": final norm within 10% of the initial norm
RADIAL_MAX = 0.5  # "along the sphere": at most half the distance travelled changes the radius
IGNORES_COS = 0.5  # "ignores the init": mean layer cosine(init, final) below 0.5
KEEPS_COS = 0.9
LINEAR = (0.8, 1.2)  # "almost linearly": growth exponent in [0.8, 1.2]
METRICS = ("test_acc", "train_acc", "dist_init_w", "dist_init_b", "norm_w", "norm_b")


def second_layer_margin(g: Group) -> Interval:
    """cos(init, final) of layer 2 minus each other layer's, the weakest difference (nan with
    fewer than three layers: there is no "middle" layer to test)."""
    ln = layers(g)
    if len(ln) < 3:
        return nan_interval("needs three or more Linear layers")
    mid = g.final(f"cos_init_{ln[1]}")
    return all_of([difference(mid, g.final(f"cos_init_{o}")) for o in ln if o != ln[1]],
                  "paired cosine differences (layer 2 minus another layer)")


def names(bs: int, adam_lr: float) -> tuple[str, str]:
    return f"SGD (lr {BASE_LR:g}, bs {bs})", f"Adam (lr {adam_lr:g}, bs {bs})"


def units(ctx: Context) -> Work:
    """SGD and Adam at one batch size, every seed."""
    st = Study(ctx)
    bs, adam_lr = st.opts.batch_size, st.opts.adam_lr
    sgd_name, adam_name = names(bs, adam_lr)
    return st.work({sgd_name: st.spec(bs),
                    adam_name: st.spec(bs, adam_lr, optimizer="adam")}, NAME)


def analyze(ctx: Context, results: Results) -> Output:
    st = Study(ctx)
    bs, adam_lr = st.opts.batch_size, st.opts.adam_lr
    sgd_name, adam_name = names(bs, adam_lr)
    groups = st.groups(results)
    sgd, adam = groups[sgd_name], groups[adam_name]
    lnames = layers(sgd)

    _, n_test = st.sizes([sgd])
    table, layer_tbl = [], []
    for g in (sgd, adam):
        alpha = growth_slope(g)
        table.append({
            "optimizer": g.name, "test acc (%)": pm(g.final("test_acc"), 100),
            "W dist. from init": pm(g.final("dist_init_w"), 1, 2),
            "B dist. from init": pm(g.final("dist_init_b"), 1, 3),
            "W norm init": pm(g.at_epoch("norm_w", 0), 1, 2),
            "W norm final": pm(g.final("norm_w"), 1, 2),
            "B norm final": pm(g.final("norm_b"), 1, 3),
            "W norm change": pm(norm_change(g), 1, 3),
            "mean layer cos": pm(mean_layer_cos(g), 1, 3),
            "alpha [95% interval]": f"{alpha.estimate:.2f} [{alpha.lo:.2f}, {alpha.hi:.2f}]",
        })
        for ln in lnames:
            layer_tbl.append({
                "optimizer": g.name, "layer": ln,
                "cos(init, final)": pm(g.final(f"cos_init_{ln}"), 1, 4),
                "norm init": pm(g.at_epoch(f"norm_{ln}_w", 0), 1, 2),
                "norm final": pm(g.final(f"norm_{ln}_w"), 1, 2),
                "dist. from init": pm(g.final(f"dist_init_{ln}_w"), 1, 2),
            })

    claims = _claims(sgd, adam, n_test)
    what = f"bs {bs}, {st.epochs} epochs (study: 30 on 60k)"
    numbers = [
        st.number("S13", "initial weight norm", "Glorot-uniform 784-1024-1024-10",
                  value_interval(sgd.at_epoch("norm_w", 0)), [sgd], "the runs' initial weights"),
        st.number("S12", "weight distance from init W", SET_ADAM,
                  value_interval(adam.final("dist_init_w")), [adam], f"Adam lr {adam_lr:g}, {what}"),
        st.number("S12", "bias distance from init B", SET_ADAM,
                  value_interval(adam.final("dist_init_b")), [adam], f"Adam lr {adam_lr:g}, {what}"),
        st.number("S12", "test accuracy", SET_ADAM, acc_interval(adam, n_test), [adam],
                  f"Adam lr {adam_lr:g}, {what}"),
        *geometry_numbers(st, sgd, SET_64, n_test, f"SGD lr {BASE_LR:g}, {what}"),
        *geometry_numbers(st, adam, SET_ADAM, n_test, f"Adam lr {adam_lr:g}, {what}"),
    ]
    summary = (f"Adam and SGD at lr {BASE_LR:g} (Adam: {adam_lr:g}), batch {bs}, E = "
               f"{st.epochs} epochs. Distances and norms are L2 over all weights (W) or all "
               f"biases (B).\n\n" + st.header([sgd, adam])
               + "\n## Geometry after epoch E\n\n" + md_table(table)
               + "\nalpha: exponent of the fit log d(t) = alpha log t + c over epochs 1..E "
               "of every seed (1 = linear growth, 0.5 = square-root).\n\n## Per layer "
               "(weights)\n\n" + md_table(layer_tbl))
    figures = {"distance_curves.png": _distance_figure(sgd, adam),
               "layer_geometry.png": _layer_figure(sgd, adam, lnames),
               "accuracy_curves.png": accuracy_figure([sgd, adam], "Adam vs SGD")}
    rows = run_rows(groups, METRICS + tuple(f"cos_init_{ln}" for ln in lnames))
    return Output(rows=rows, summary=summary, claims=claims, figures=figures,
                  study_numbers=numbers, extra_files={"curves.csv": curves_csv(groups, (*ACC_METRICS, "dist_init",
                                                                 "norm_w", "norm_b"))})


def radial_share(g: Group) -> list[float]:
    """Per seed, (final weight norm - initial) / distance from init: the share of the
    displacement that changed the radius (1 = straight out, 0 = along the sphere)."""
    return [(f - i) / d if d > 0 else float("nan")
            for f, i, d in zip(g.final("norm_w"), g.at_epoch("norm_w", 0), g.final("dist_init_w"))]


def sphere_by_construction(reach: list[float]) -> str | None:
    """Why the +-SPHERE_TOL band holds by construction, when it does: every seed travelled
    less than SPHERE_TOL of its initial norm, and ||w| - |w0|| <= |w - w0|."""
    finite = [r for r in reach if math.isfinite(r)]
    if finite and max(finite) <= SPHERE_TOL:
        return (f"every seed travelled at most {max(finite):.3g} of its initial norm (distance "
                f"from init / initial norm), below the {SPHERE_TOL:g} band: by the triangle "
                "inequality the norm cannot leave it, whatever the direction of travel")
    return None


def _claims(sgd: Group, adam: Group, n_test: int) -> list[Claim]:
    ev = per_seed(**{f"{k} {g.name}": g.final(k) for g in (sgd, adam)
                     for k in ("test_acc", "norm_w", "dist_init_w")})
    reach = [d / i if i > 0 else float("nan")
             for d, i in zip(sgd.final("dist_init_w"), sgd.at_epoch("norm_w", 0))]
    cos_ev = per_seed(**{f"mean layer cos {g.name}": mean_layer_cos(g) for g in (sgd, adam)},
                      **{f"cos {ln} {sgd.name}": sgd.final(f"cos_init_{ln}") for ln in layers(sgd)})
    return [
        Claim("adam-generalizes-worse", "S12", "Adam generalizes worse than SGD",
              acc_difference(sgd, adam, n_test), above(0.0),
              f"test accuracy of {sgd.name} minus {adam.name}, paired by seed", ev,
              reading="generalizes worse = a lower final test accuracy once both have "
              "converged", primary=True, gates=converged_all(sgd, adam)),
        Claim("adam-larger-weights", "S12", "Adam finds much larger weights than SGD",
              ratio(adam.final("norm_w"), sgd.final("norm_w")), above(MUCH_LARGER),
              f"weight norm of {adam.name} / {sgd.name}", ev,
              reading=f"much larger = at least {MUCH_LARGER:g}x SGD's weight norm", primary=True),
        Claim("adam-farther-from-init", "S12", "Adam travels much farther from init than SGD",
              ratio(adam.final("dist_init_w"), sgd.final("dist_init_w")), above(MUCH_LARGER),
              f"W distance from init of {adam.name} / {sgd.name}", ev,
              reading="larger weights read as the distance from init (study: 254 vs 6.7)",
              primary=False),
        Claim("adam-linear-growth", "S12", "Adam's distance from init grows almost linearly "
              "with epochs", growth_slope(adam), between(*LINEAR),
              f"growth exponent of {adam.name}'s W distance from init (one slope of log W on "
              "log epoch per seed)", {"runs": len(adam.runs)},
              reading=f"almost linearly = exponent in [{LINEAR[0]:g}, {LINEAR[1]:g}]",
              primary=True),
        Claim("sgd-on-sphere", "S13", "SGD stays near the sphere of its initial radius",
              value_interval(norm_change(sgd)), within(SPHERE_TOL),
              f"relative change of {sgd.name}'s weight norm, final / initial - 1",
              per_seed(**{"norm change": norm_change(sgd), "distance / initial norm": reach}),
              reading=f"the final norm within {SPHERE_TOL:.0%} of the initial one (a check "
              "while the distance travelled cannot leave the band)",
              primary=False, construction=sphere_by_construction(reach)),
        Claim("sgd-along-sphere", "S13", "SGD moves along the sphere of its initial radius, "
              "not off it", value_interval(radial_share(sgd), "radial shares"),
              within(RADIAL_MAX), f"radial share of {sgd.name}'s displacement: (final norm - "
              "initial norm) / distance from init", per_seed(**{"radial share": radial_share(
                  sgd), "radial share of Adam": radial_share(adam)}),
              reading=f"at most {RADIAL_MAX:g} of the distance travelled changes the radius (the "
              "primary reading: it can fail at any distance travelled)", primary=True),
        Claim("adam-ignores-init", "S13", "Adam ignores the initialization: its final weights "
              "are nearly unaligned with the initial ones",
              value_interval(mean_layer_cos(adam)), below(IGNORES_COS),
              f"mean per-layer cosine(init, final) of {adam.name}", cos_ev, primary=True),
        Claim("sgd-keeps-direction", "S13", "SGD's final weights stay aligned with the initial "
              "ones", value_interval(mean_layer_cos(sgd)), above(KEEPS_COS),
              f"mean per-layer cosine(init, final) of {sgd.name}", cos_ev, primary=False),
        Claim("middle-layer-changes-least", "S14", "under SGD the second (middle) layer changes "
              "least (highest cosine to its init)", second_layer_margin(sgd), above(0.0),
              f"cosine(init, final) of layer 2 minus each other layer's ({sgd.name}; the "
              f"weakest difference decides)", cos_ev, primary=True),
    ]


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
        ratio = [mean(norm_change(g, f"norm_{ln}_w")) + 1 for ln in lnames]
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


EXPERIMENT = Experiment(NAME, "Adam vs SGD: weight geometry", units, analyze,
                        "Distance from init/origin and per-layer cosines, Adam vs SGD.")
