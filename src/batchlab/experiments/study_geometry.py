"""Weight geometry of the MNIST study's runs, shared by distance and adam-vs-sgd: per-layer
cosines and norms, the growth exponent of the distance from init, and the study's W/B/A and
sphere numbers (S9, S10, S13) measured on our runs.

Why its own module: both experiments read the same probe metrics (`probes/geometry.py`) and
fill overlapping rows of `findings.STUDY_NUMBERS`; one reading keeps them consistent.
"""

from __future__ import annotations

import math
import re

import numpy as np

from batchlab.experiments import findings
from batchlab.experiments.intervals import Interval, slope
from batchlab.experiments.study import (
    SET_64,
    SET_1024,
    SET_1024_LONG,
    SET_1024_LR,
    Group,
    Study,
    acc_interval,
    mean,
    nan_float,
    value_interval,
)


def layers(g: Group) -> list[str]:
    """Layer names (layer1..layerN) present in the geometry probe's metrics."""
    keys = g.runs[0].epochs[0] if g.runs and g.runs[0].epochs else {}
    return sorted({m.group(1) for k in keys if (m := re.fullmatch(r"cos_init_(layer\d+)", k))},
                  key=lambda s: int(s[5:]))


def norm_change(g: Group, key: str = "norm_w") -> list[float]:
    """Relative change of a norm, final / initial - 1, per seed (0 = on the initial sphere)."""
    return [f / i - 1 if i > 0 else float("nan") for f, i in zip(g.final(key), g.at_epoch(key, 0))]


def mean_layer_cos(g: Group) -> list[float]:
    """Mean over Linear layers of cos(initial, final weights), per seed."""
    per_layer = np.array([g.final(f"cos_init_{ln}") for ln in layers(g)])
    return per_layer.mean(axis=0).tolist() if per_layer.size else [float("nan")] * len(g.runs)


def growth_series(g: Group, key: str = "dist_init_w") -> list[tuple[list[float], list[float]]]:
    """Per completed seed, (log epoch, log distance) over epochs 1..end."""
    series = []
    for r in g.runs:
        if r.status != "completed":
            continue
        xs, ys = [], []
        for e in r.epochs[1:]:
            ep, d = nan_float(e.get("epoch")), nan_float(e.get(key))
            if ep > 0 and d > 0:
                xs.append(math.log(ep))
                ys.append(math.log(d))
        series.append((xs, ys))
    return series


def growth_slope(g: Group, key: str = "dist_init_w") -> Interval:
    """Exponent alpha of d(t) ~ t^alpha (1 = linear growth, 0.5 = square-root growth): one
    least-squares slope of log distance on log epoch per seed (epochs 1..end), t interval over
    seeds. The epochs of a run are one replicate's curve, never counted as n."""
    return slope(growth_series(g, key), what="growth exponents (log distance on log epoch)")


def geometry_numbers(st: Study, g: Group, setting: str, n_test: int, what: str,
                     quantities: tuple[str, ...] = ("W", "B", "A", "cos")
                     ) -> list[findings.StudyNumber]:
    """S13's row for one run: distance to the origin (W, B), test accuracy, per-layer cosines."""
    out = []
    if "W" in quantities:
        out.append(st.number("S13", "weight distance to origin W", setting,
                             value_interval(g.final("norm_w")), [g], what))
    if "B" in quantities:
        out.append(st.number("S13", "bias distance to origin B", setting,
                             value_interval(g.final("norm_b")), [g], what))
    if "A" in quantities:
        out.append(st.number("S13", "test accuracy", setting, acc_interval(g, n_test), [g], what))
    if "cos" in quantities:
        for i, ln in enumerate(layers(g)[:3]):
            out.append(st.number("S13", f"cosine(init, final) layer {i + 1}", setting,
                                 value_interval(g.final(f"cos_init_{ln}")), [g], what))
    return out


def distance_numbers(st: Study, groups: dict[str, Group], cells: list[str], ref: Group,
                     same_e: Group, fast: Group, long: Group,
                     n_test: int) -> list[findings.StudyNumber]:
    """The distance experiment's study numbers: S9 (bs 64), S10 (the long run), S13 (bs 1024
    at both lrs and the long run; bs 64's row comes from adam-vs-sgd)."""
    e = st.epochs
    out = []
    steps = [nan_float(g.runs[0].epochs[-1].get("steps")) if g.runs and g.runs[0].epochs
             else math.nan for g in (long, ref)]
    matched = ("about the steps of " + ref.name if abs(steps[0] / steps[1] - 1) < 0.05 else
               f"{steps[0]:.0f} steps, not the {steps[1]:.0f} of {ref.name}")
    for finding, g, setting, what in (
            ("S9", ref, SET_64, f"{ref.name}, {e} epochs (study: 30 on 60k)"),
            ("S10", long, SET_1024_LONG, f"{long.name} ({matched}; study: 480 epochs "
                                         "= the steps of bs 64 x 30)")):
        out += [st.number(finding, "weight distance from init W", setting,
                          value_interval(g.final("dist_init_w")), [g], what),
                st.number(finding, "bias distance from init B", setting,
                          value_interval(g.final("dist_init_b")), [g], what),
                st.number(finding, "test accuracy", setting, acc_interval(g, n_test), [g], what)]
    finite = [c for c in cells if math.isfinite(mean(groups[c].final("test_acc")))]
    if finite:
        best = groups[max(finite, key=lambda c: mean(groups[c].final("test_acc")))]
        out.append(st.number("S9", "distance of the best solutions from init", "best runs",
                             value_interval(best.final("dist_init_w")), [best],
                             f"W of the most accurate cell of the grid ({best.name}, {e} epochs)"))
    for g, setting in ((same_e, SET_1024), (fast, SET_1024_LR), (long, SET_1024_LONG)):
        out += geometry_numbers(st, g, setting, n_test, f"{g.name} (study: E = 30 on 60k)")
    return out
