"""One decision rule for every claim: a 95% interval against a region, and four outcomes.

A claim names a quantity (a paired difference of accuracies, a log ratio, a slope, a rank
correlation, ...) and the region the claim puts it in: `above(t)`, `below(t)` or
`between(lo, hi)` (closed sets). `intervals.py` computes a point estimate and a 95% interval
[lo, hi] over independent replicates (training seeds). Then

    reproduced      iff the whole interval lies in the region      (lo >= lower and hi <= upper)
    not_reproduced  iff the whole interval lies outside the region (hi < lower or lo > upper)
    inconclusive    otherwise,

unless the claim is `untestable` (decided in `claims.Claim`, with a machine-readable reason):
its premise does not hold at the budget run (a regime gate: arms not converged, train
accuracies not comparable), it holds by construction (an identity, a design constant,
sampling theory: shown as a check, never counted as evidence), or its interval has zero width
(every replicate gave the same value: no spread to decide with).

Why this rule: noise only widens the interval, and a wider interval can only leave "reproduced"
or "not_reproduced" for "inconclusive" - never the other way round. Equivalence claims
("reaches", "about the same") are `between(-tol, tol)` regions on the difference (an
equivalence test); trend claims put a per-replicate slope or rank correlation in a region.
`decide` is all a reader needs to recheck a verdict from `claims.json`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import stats

from batchlab.experiments.intervals import Interval

REPRODUCED, NOT_REPRODUCED, INCONCLUSIVE = "reproduced", "not_reproduced", "inconclusive"
UNTESTABLE = "untestable"
VERDICTS = (REPRODUCED, NOT_REPRODUCED, INCONCLUSIVE, UNTESTABLE)
LEVEL = 0.95
INF = math.inf


# -- regions ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Region:
    """A closed set [lower, upper] on the real line; one of the bounds may be infinite."""

    lower: float = -INF
    upper: float = INF

    def to_json(self) -> dict[str, Any]:
        if self.lower == -INF:
            return {"below": self.upper}
        if self.upper == INF:
            return {"above": self.lower}
        return {"between": [self.lower, self.upper]}

    @staticmethod
    def from_json(d: dict[str, Any]) -> Region:
        if "above" in d:
            return above(d["above"])
        if "below" in d:
            return below(d["below"])
        lo, hi = d["between"]
        return between(lo, hi)

    def describe(self) -> str:
        if self.lower == -INF:
            return f"<= {self.upper:g}"
        if self.upper == INF:
            return f">= {self.lower:g}"
        return f"in [{self.lower:g}, {self.upper:g}]"


def above(t: float) -> Region:
    return Region(lower=float(t))


def below(t: float) -> Region:
    return Region(upper=float(t))


def between(lo: float, hi: float) -> Region:
    if not lo < hi:
        raise ValueError(f"between({lo}, {hi}) needs lo < hi")
    return Region(lower=float(lo), upper=float(hi))


def within(tolerance: float, center: float = 0.0) -> Region:
    """The equivalence region center +- tolerance."""
    return between(center - tolerance, center + tolerance)


# -- intervals: see `intervals.py` (the replicate-based methods) --------------------------------
def decide(lo: float, hi: float, region: Region, estimate: float = 0.0) -> str:
    """The verdict of an interval [lo, hi] against a region (see the module docstring)."""
    if any(isinstance(v, float) and math.isnan(v) for v in (lo, hi, estimate)):
        return INCONCLUSIVE
    if lo >= region.lower and hi <= region.upper:
        return REPRODUCED
    if hi < region.lower or lo > region.upper:
        return NOT_REPRODUCED
    return INCONCLUSIVE


# -- LEGACY interval methods (pseudo-replicated: n counts runs, epochs or trials and accuracy
# errors are unpaired). Kept only until every experiment builds its claims from `intervals.py`.
def finite(values: Sequence[float | None]) -> np.ndarray:
    return np.asarray([float(v) for v in values if v is not None and math.isfinite(float(v))],
                      dtype=float)


def _t(df: float) -> float:
    return float(stats.t.ppf(0.5 + LEVEL / 2, df)) if df > 0 else INF


Z = float(stats.norm.ppf(0.5 + LEVEL / 2))


def nan_interval(method: str, n: int = 0) -> Interval:
    return Interval(math.nan, math.nan, math.nan, n, method)


def accuracy_var(p: float, n_test: int | None) -> float:
    """Binomial sampling variance of an accuracy measured on `n_test` examples."""
    if not n_test or not math.isfinite(p):
        return 0.0
    p = min(max(p, 0.0), 1.0)
    # never zero: a perfect score on n examples still has a 1/n-sized uncertainty (rule of 3)
    return max(p * (1 - p), 1.0 / n_test) / n_test


def _mean_se(a: np.ndarray, n_test: int | None) -> tuple[float, float, float]:
    """(mean, squared standard error, degrees of freedom) with the sampling term."""
    m = float(a.mean())
    seed_var = float(a.var(ddof=1)) / a.size if a.size > 1 else 0.0
    samp = accuracy_var(m, n_test)
    return m, seed_var + samp, float(a.size - 1)


def mean_interval(values: Sequence[float | None], n_test: int | None = None) -> Interval:
    """Mean over seeds with a t interval; `n_test` adds the test-set sampling error."""
    a = finite(values)
    method = "t interval over seeds" + (f" + binomial error of {n_test} test examples" if n_test else "")
    if a.size == 0:
        return nan_interval(method)
    m, se2, df = _mean_se(a, n_test)
    if a.size < 2 and not n_test:
        return Interval(m, -INF, INF, 1, method + " (one seed: unbounded)")
    q = _t(df) if a.size >= 2 else Z
    h = q * math.sqrt(se2)
    return Interval(m, m - h, m + h, int(a.size), method)


def difference(a: Sequence[float | None], b: Sequence[float | None],
               n_test: int | None = None) -> Interval:
    """mean(a) - mean(b) with a Welch interval (plus both test-set sampling errors)."""
    x, y = finite(a), finite(b)
    method = "Welch t interval over seeds" + (f" + binomial error of {n_test} test examples"
                                               if n_test else "")
    if x.size == 0 or y.size == 0:
        return nan_interval(method)
    mx, vx, _ = _mean_se(x, n_test)
    my, vy, _ = _mean_se(y, n_test)
    d = mx - my
    se2 = vx + vy
    if (x.size < 2 or y.size < 2) and not n_test:
        return Interval(d, -INF, INF, int(min(x.size, y.size)), method + " (one seed: unbounded)")
    sx = float(x.var(ddof=1)) / x.size if x.size > 1 else 0.0
    sy = float(y.var(ddof=1)) / y.size if y.size > 1 else 0.0
    if x.size >= 2 and y.size >= 2 and (sx + sy) > 0:
        # Welch-Satterthwaite degrees of freedom of the seed part
        df = (sx + sy) ** 2 / ((sx**2 / (x.size - 1) if x.size > 1 else 0)
                               + (sy**2 / (y.size - 1) if y.size > 1 else 0) or 1e-300)
        q = _t(df)
    else:
        q = Z
    h = q * math.sqrt(se2)
    return Interval(d, d - h, d + h, int(min(x.size, y.size)), method)


def log_ratio(a: Sequence[float | None], b: Sequence[float | None]) -> Interval:
    """log(mean-ish a / b) as the difference of mean logs, Welch interval (positive values)."""
    x = [math.log(v) for v in finite(a) if v > 0]
    y = [math.log(v) for v in finite(b) if v > 0]
    iv = difference(x, y)
    return Interval(iv.estimate, iv.lo, iv.hi, iv.n, "log ratio, " + iv.method)


def ratio(a: Sequence[float | None], b: Sequence[float | None]) -> Interval:
    """mean(a)/mean(b) as exp of the `log_ratio` interval."""
    return log_ratio(a, b).map(math.exp, "ratio = exp(difference of mean logs), Welch t interval")


def correlation(x: Sequence[float], y: Sequence[float]) -> Interval:
    """Spearman's rho over finite pairs with the Fisher-z interval (Fieller et al.)."""
    xa, ya = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    ok = np.isfinite(xa) & np.isfinite(ya)
    xa, ya = xa[ok], ya[ok]
    n = int(xa.size)
    method = "Spearman rho, Fisher-z interval (se = sqrt(1.06/(n-3)))"
    if n < 3 or np.ptp(xa) == 0 or np.ptp(ya) == 0:
        return nan_interval(method, n)
    rho = float(stats.spearmanr(xa, ya).statistic)
    if n <= 3:
        return Interval(rho, -1.0, 1.0, n, method + " (n <= 3: no information)")
    z = math.atanh(max(min(rho, 1 - 1e-12), -1 + 1e-12))
    h = Z * math.sqrt(1.06 / (n - 3))
    return Interval(rho, math.tanh(z - h), math.tanh(z + h), n, method)


def slope(x: Sequence[float], y: Sequence[float]) -> Interval:
    """Least-squares slope of y on x with its t interval (n - 2 degrees of freedom)."""
    xa, ya = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    ok = np.isfinite(xa) & np.isfinite(ya)
    xa, ya = xa[ok], ya[ok]
    method = "least-squares slope, t interval"
    if xa.size < 2 or np.ptp(xa) == 0:
        return nan_interval(method, int(xa.size))
    res = stats.linregress(xa, ya)
    if xa.size < 3:
        return Interval(float(res.slope), -INF, INF, int(xa.size), method + " (2 points: unbounded)")
    h = _t(xa.size - 2) * float(res.stderr)
    return Interval(float(res.slope), float(res.slope) - h, float(res.slope) + h, int(xa.size), method)


def bootstrap(samples: Sequence[Any], statistic: Callable[[np.ndarray], float],
              n_boot: int = 2000, seed: int = 0) -> Interval:
    """Percentile bootstrap of `statistic` over the first axis of `samples` (trials)."""
    arr = np.asarray(samples)
    method = f"percentile bootstrap over trials ({n_boot} resamples, seed {seed})"
    if len(arr) < 2:
        return nan_interval(method, len(arr))
    est = float(statistic(arr))
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(arr), size=(n_boot, len(arr)))
    reps = np.asarray([statistic(arr[i]) for i in idx], dtype=float)
    reps = reps[np.isfinite(reps)]
    if reps.size < n_boot // 2:
        return nan_interval(method, len(arr))
    lo, hi = np.quantile(reps, [(1 - LEVEL) / 2, (1 + LEVEL) / 2])
    return Interval(est, float(lo), float(hi), len(arr), method)


def proportion(k: int, n: int) -> Interval:
    """Wilson score interval for k successes out of n."""
    method = "Wilson score interval"
    if n <= 0:
        return nan_interval(method)
    p = k / n
    den = 1 + Z**2 / n
    c = (p + Z**2 / (2 * n)) / den
    h = Z * math.sqrt(p * (1 - p) / n + Z**2 / (4 * n * n)) / den
    return Interval(p, max(0.0, c - h), min(1.0, c + h), n, method)


def all_of(parts: Sequence[Interval]) -> Interval:
    """A claim that needs several quantities in the same region: the weakest part decides.
    Returns the part whose interval reaches lowest (use with an `above` region)."""
    finite_parts = [p for p in parts if not math.isnan(p.lo)]
    if len(finite_parts) < len(parts) or not parts:
        return nan_interval("minimum over parts", 0)
    worst = min(parts, key=lambda p: p.lo)
    return Interval(worst.estimate, worst.lo, min(p.hi for p in parts), worst.n,
                    "minimum over parts: " + worst.method)
