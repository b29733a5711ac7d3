"""95% intervals whose `n` counts independent replicates, and nothing else.

A replicate is one independent repetition of the whole measurement: a training seed (for
gradient competition, the checkpoint of one training seed). Every interval here is built in
two steps, so that pseudo-replication cannot happen by construction:

1. the caller reduces everything measured inside a replicate (epochs, trials, draws, test
   examples) to ONE number per replicate - a paired difference of accuracies, a log ratio, a
   fitted slope, a rank correlation, ...;
2. `replicate_mean` puts a Student t interval over those numbers (n - 1 degrees of freedom),
   optionally widened by a *known* variance that no seed repetition can show (the test set's
   sampling error: every arm is scored on the same finite test set, so its error is common to
   all seeds and invisible in their spread). The two parts are combined with
   Welch-Satterthwaite degrees of freedom, the known part counting as infinite df.

With one replicate there is no replicate variance: the interval is unbounded unless the caller
supplies a pooled variance measured on other arms of the same design (`Pooled`, df stated).
A spread of exactly zero gives a zero-width interval; `claims.Claim` turns that into the
outcome `untestable` instead of letting it decide.

Every interval records a `spec` - its kind, known and floor variances, degrees of freedom,
transform - from which `interval_audit.recompute` rebuilds it exactly from its per-replicate
values: that is how `claims.check_document` rechecks an interval from `claims.json` alone.
Accuracies on a shared test set are in `accuracies.py`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy import stats

LEVEL = 0.95
INF = math.inf
Z = float(stats.norm.ppf(0.5 + LEVEL / 2))


@dataclass(frozen=True)
class Pooled:
    """A seed variance pooled over arms of one design: `var` per replicate, with `df`."""

    var: float
    df: float


@dataclass(frozen=True)
class Interval:
    """A point estimate and its 95% interval. `n` = independent replicates behind it;
    `replicates` = the per-replicate values it was computed from (on the scale of `spec`);
    `spec` = what `recompute` needs to rebuild it."""

    estimate: float
    lo: float
    hi: float
    n: int
    method: str
    replicates: tuple[float, ...] = ()
    spec: dict[str, Any] = field(default_factory=dict)

    @property
    def finite_estimate(self) -> bool:
        return math.isfinite(self.estimate)

    @property
    def zero_width(self) -> bool:
        return math.isfinite(self.lo) and self.lo == self.hi

    def map(self, f: Callable[[float], float], method: str | None = None) -> Interval:
        """Push the interval through a monotone increasing function (e.g. exp of a log ratio).
        The replicates stay on the scale the interval was computed on (the spec says which)."""
        transform = self.spec.get("transform", "identity")
        if f is math.exp and transform == "identity":
            transform = "exp"
        return Interval(f(self.estimate), f(self.lo), f(self.hi), self.n, method or self.method,
                        self.replicates, {**self.spec, "transform": transform})


def finite(values: Sequence[float | None]) -> np.ndarray:
    return np.asarray([float(v) for v in values if v is not None and math.isfinite(float(v))],
                      dtype=float)


def t_quantile(df: float) -> float:
    if df == INF:
        return Z
    return float(stats.t.ppf(0.5 + LEVEL / 2, df)) if df > 0 else INF


def nan_interval(method: str, n: int = 0, replicates: Sequence[float] = ()) -> Interval:
    return Interval(math.nan, math.nan, math.nan, n, method, tuple(float(v) for v in replicates),
                    {"kind": "none"})


# -- the one interval over replicates ---------------------------------------------------------
def replicate_mean(values: Sequence[float | None], *, known_var: float = 0.0,
                   floor_var: float = 0.0, pooled: Pooled | None = None,
                   what: str = "per-replicate values", clip: tuple[float, float] | None = None,
                   df_rule: str = "replicates") -> Interval:
    """Mean of one value per replicate with a t interval.

    known_var: a variance of the mean that the replicates cannot show (infinite df), e.g. the
        test set's sampling error of an accuracy;
    floor_var: a lower bound on the variance of ONE replicate's value (used when the observed
        spread is smaller, e.g. the sampling variance of a rank correlation over m points);
    pooled: a pooled seed variance (used instead of the observed one when given);
    clip: the quantity's range (a correlation's [-1, 1]);
    df_rule: "replicates" (the t quantile has the replicates' n - 1 df, or the pooled df,
        whatever the known part: valid for any split between the two variances) or
        "satterthwaite" (Welch-Satterthwaite df, the known part counting as infinite df).
        `benchmarks/verdict_calibration.py` measured Satterthwaite's wrong "reproduced" rate at
        the boundary of a paired accuracy difference at 6.8% with 2 seeds and 4.6% with 3, so
        "replicates" is the default and the only rule the experiments use.
    """
    a = finite(values)
    n = int(a.size)
    spec: dict[str, Any] = {"kind": "mean", "known_var": float(known_var),
                            "floor_var": float(floor_var), "transform": "identity",
                            "df_rule": df_rule}
    if pooled is not None:
        spec["pooled"] = {"var": pooled.var, "df": pooled.df}
    method = f"t interval over {n} independent replicate(s) of the {what}"
    if known_var > 0:
        method += (" + the test set's sampling error (Satterthwaite df)" if df_rule ==
                   "satterthwaite" else " + the test set's sampling error")
    if floor_var > 0:
        method += " (variance floored at the within-replicate sampling variance)"
    if n == 0:
        return nan_interval(method)
    m = float(a.mean())
    if pooled is not None:
        rep_var, df_rep = max(pooled.var, floor_var), pooled.df
        method += f"; pooled seed variance with {pooled.df:g} df"
    elif n >= 2:
        rep_var, df_rep = max(float(a.var(ddof=1)), floor_var), float(n - 1)
    else:
        spec["df"] = None
        return Interval(m, -INF, INF, 1, method + "; one replicate: no replicate variance, "
                        "unbounded", tuple(a.tolist()), spec)
    A = rep_var / n
    total = A + known_var
    df = df_rep
    if df_rule == "satterthwaite" and A > 0:
        df = total**2 / (A**2 / df_rep)
    elif df_rule == "satterthwaite":
        df = INF
    h = t_quantile(df) * math.sqrt(total)
    lo, hi = m - h, m + h
    if clip is not None:
        lo, hi = max(lo, clip[0]), min(hi, clip[1])
        spec["clip"] = list(clip)
    spec["df"] = None if df == INF else df
    return Interval(m, lo, hi, n, method, tuple(a.tolist()), spec)


def paired(a: Sequence[float | None], b: Sequence[float | None]) -> list[float]:
    """Per-replicate differences a_s - b_s of two arms aligned by replicate (seed); a pair
    with a missing or non-finite side is dropped."""
    out = []
    for x, y in zip(a, b):
        if x is None or y is None:
            continue
        x, y = float(x), float(y)
        if math.isfinite(x) and math.isfinite(y):
            out.append(x - y)
    return out


def difference(a: Sequence[float | None], b: Sequence[float | None], *,
               known_var: float = 0.0, pooled: Pooled | None = None) -> Interval:
    """mean(a_s - b_s) over replicates (paired by seed: the arms share seeds, so the pair is
    one replicate and the pairing removes what the seed does to both)."""
    return replicate_mean(paired(a, b), known_var=known_var, pooled=pooled,
                          what="paired differences")


def log_ratio(a: Sequence[float | None], b: Sequence[float | None]) -> Interval:
    """mean over replicates of log(a_s / b_s) (positive values, paired by seed)."""
    logs = [math.log(x / y) for x, y in zip(a, b)
            if x is not None and y is not None and math.isfinite(x) and math.isfinite(y)
            and x > 0 and y > 0]
    return replicate_mean(logs, what="paired log ratios")


def ratio(a: Sequence[float | None], b: Sequence[float | None]) -> Interval:
    """The geometric-mean ratio a/b: exp of the `log_ratio` interval."""
    return log_ratio(a, b).map(math.exp, "ratio = exp(mean of per-replicate log ratios), "
                                         "t interval over replicates")


def log_mean(values: Sequence[float | None], what: str = "logs") -> Interval:
    """A geometric mean of positive per-replicate values: exp of the mean of logs."""
    logs = [math.log(v) for v in finite(values) if v > 0]
    return replicate_mean(logs, what=what).map(math.exp, f"exp of a t interval over replicates "
                                                         f"of {what}")


def ls_slope(x: Sequence[float], y: Sequence[float]) -> float:
    """Least-squares slope of y on x over finite pairs (NaN with < 2 distinct x)."""
    xa, ya = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    ok = np.isfinite(xa) & np.isfinite(ya)
    xa, ya = xa[ok], ya[ok]
    if xa.size < 2 or np.ptp(xa) == 0:
        return math.nan
    xc = xa - xa.mean()
    return float((xc * (ya - ya.mean())).sum() / (xc * xc).sum())


def slope(series: Sequence[tuple[Sequence[float], Sequence[float]]], what: str = "slopes"
          ) -> Interval:
    """One least-squares slope per replicate ((x, y) per replicate), t interval over them:
    epochs or grid points inside a replicate are never counted as n."""
    return replicate_mean([ls_slope(x, y) for x, y in series], what=what)


def kendall(x: Sequence[float], y: Sequence[float]) -> tuple[float, int]:
    """Kendall's tau-b over finite pairs and the number of pairs (NaN when undefined):
    sum of sign products over pairs / sqrt(untied pairs in x x untied pairs in y)."""
    xa, ya = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    ok = np.isfinite(xa) & np.isfinite(ya)
    xa, ya = xa[ok], ya[ok]
    if xa.size < 2:
        return math.nan, int(xa.size)
    sx = np.sign(xa[:, None] - xa[None, :])
    sy = np.sign(ya[:, None] - ya[None, :])
    den = math.sqrt(float((sx * sx).sum()) * float((sy * sy).sum()))
    if den == 0:
        return math.nan, int(xa.size)
    return float((sx * sy).sum()) / den, int(xa.size)


def tau_null_var(m: int) -> float:
    """The exact variance of Kendall's tau over m untied points under independence."""
    return 2.0 * (2 * m + 5) / (9.0 * m * (m - 1)) if m >= 2 else math.inf


def correlation(series: Sequence[tuple[Sequence[float], Sequence[float]]],
                what: str = "Kendall tau") -> Interval:
    """Kendall's tau per replicate, t interval over replicates, each replicate's variance
    floored at tau's exact null variance over its m points (`tau_null_var`). Why the floor: a
    perfect ordering in every replicate (|tau| = 1, spread 0) would otherwise give a zero-width
    interval, and without it the t interval over a few bounded, skewed taus was measured
    anti-conservative at the boundary (4-5% wrong "reproduced" with 5 replicates,
    `benchmarks/verdict_calibration.py`). With few points per replicate it decides little:
    for a monotone trend prefer `slope` on a log scale."""
    taus, ms = [], []
    for x, y in series:
        t, m = kendall(x, y)
        if math.isfinite(t):
            taus.append(t)
            ms.append(m)
    floor = float(np.mean([tau_null_var(m) for m in ms])) if ms else 0.0
    return replicate_mean(taus, floor_var=floor, what=what, clip=(-1.0, 1.0))


def proportion(k: int, n: int, what: str = "replicates") -> Interval:
    """k of n replicates: the exact (Clopper-Pearson) interval, which never under-covers."""
    method = f"Clopper-Pearson exact interval, {k} of {n} {what}"
    spec = {"kind": "proportion", "k": int(k), "trials": int(n)}
    if n <= 0:
        return Interval(math.nan, math.nan, math.nan, 0, method, (), spec)
    ci = stats.binomtest(int(k), int(n)).proportion_ci(confidence_level=LEVEL, method="exact")
    reps = tuple([1.0] * int(k) + [0.0] * int(n - k))
    return Interval(k / n, float(ci.low), float(ci.high), int(n), method, reps, spec)


def all_of(parts: Sequence[Interval], what: str = "parts") -> Interval:
    """A claim that needs every part in an `above` region: the part reaching lowest decides
    (its interval is returned, so the claim is reproduced only if every part is)."""
    if not parts or any(math.isnan(p.lo) for p in parts):
        return nan_interval(f"minimum over {what}")
    worst = min(parts, key=lambda p: p.lo)
    return Interval(worst.estimate, worst.lo, worst.hi, worst.n,
                    f"the weakest of {len(parts)} {what}: {worst.method}", worst.replicates,
                    worst.spec)


def hull(parts: Sequence[Interval], what: str = "parts") -> Interval:
    """The smallest interval containing every part: reproduced only if every part lies in the
    region, not reproduced only if every part lies outside it on one side."""
    if not parts or any(math.isnan(p.lo) or math.isnan(p.hi) for p in parts):
        return nan_interval(f"hull over {what}")
    n = min(p.n for p in parts)
    return Interval(float(np.mean([p.estimate for p in parts])), min(p.lo for p in parts),
                    max(p.hi for p in parts), n, f"hull of the {what} intervals "
                    f"({parts[0].method})", parts[0].replicates,
                    {"kind": "hull", "parts": [{"estimate": p.estimate, "ci": [p.lo, p.hi],
                                                "n": p.n, "replicates": list(p.replicates),
                                                "spec": p.spec} for p in parts]})
