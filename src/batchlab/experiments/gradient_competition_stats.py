"""Gradient competition, statistics: everything is computed INSIDE one replicate first.

A replicate is the checkpoint of one training seed. Its trials (fresh samples each) and its
decomposition trials (fixed sample sets x orders) are reduced here to one number per
(regime, reading, batch size) - a mean norm, a coefficient of variation, a median |value|, a
fraction of values above a threshold common to every batch size, a relative spread across
sample sets - and then to one number per replicate per claim (a fitted exponent, a slope, a
Kendall tau, a ratio). `gradient_competition_claims` puts the interval across replicates over
those numbers; trials are never counted as n.

Also the two open questions of the study, descriptive only: the functional form of
std(norm) vs b and the sample-vs-order variance decomposition. Pure functions of stored trial
records.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import numpy as np
from scipy import optimize, stats

from batchlab.analysis.gradcomp_stats import TAIL_K, ValueStats, norms_array
from batchlab.experiments.intervals import kendall, ls_slope

ByB = dict[int, dict[str, Any]]  # {b: trial record} of one replicate, regime and design


def diverged(rec: dict[str, Any], mode: str) -> int:
    """Trials of one record flagged as blown up in `mode` (excluded from every statistic)."""
    return int(sum(bool(x) for x in rec["modes"][mode]["blowup"]))


def per_b(by_b: ByB, mode: str) -> list[dict[str, Any]]:
    """One row per batch size of one replicate: the norm's mean, std and coefficient of
    variation over the trials that did not diverge, the diverged count, and the value
    statistics (RMS, kurtosis, median |value|) of the kept trials."""
    rows = []
    for b, rec in sorted(by_b.items()):
        v = norms_array(rec, mode)
        mean = float(np.mean(v)) if len(v) else math.nan
        std = float(np.std(v, ddof=1)) if len(v) > 1 else math.nan
        vs = ValueStats.from_json(rec["modes"][mode]["values"])
        rows.append({"b": b, "trials": rec["trials"], "kept": int(len(v)),
                     "diverged": diverged(rec, mode), "mean": mean, "std": std,
                     "cv": std / mean if mean > 0 else math.nan, **vs.summary(),
                     "seconds": rec["seconds"], "k": rec["k"],
                     "engine": rec.get("engine", "fused")})
    return rows


def _log(v: float) -> float:
    return math.log(v) if v > 0 and math.isfinite(v) else math.nan


def exponent(rows: list[dict[str, Any]]) -> float:
    """p in mean norm ~ b^p: the least-squares slope of log(mean) on log(b) over the batch
    sizes of one replicate (a b whose trials all diverged drops out)."""
    return ls_slope([math.log(r["b"]) for r in rows], [_log(r["mean"]) for r in rows])


def exponent_se(rows: list[dict[str, Any]]) -> float:
    """The within-replicate standard error of `exponent` from trial noise alone: the SE of
    log(mean) at each b is about cv / sqrt(kept), propagated through the least-squares slope.
    Why: it is the resolution argument for the trials per checkpoint - it must be small
    against the regions' width, and against the spread between seeds that the interval
    measures, for fewer trials to lose nothing."""
    pts = [(math.log(r["b"]), r["cv"] / math.sqrt(r["kept"])) for r in rows
           if r["kept"] >= 2 and math.isfinite(r["cv"])]
    if len(pts) < 2:
        return math.nan
    x = np.array([p[0] for p in pts])
    se = np.array([p[1] for p in pts])
    w = (x - x.mean()) / float(((x - x.mean()) ** 2).sum())
    return float(math.sqrt(float((w * w * se * se).sum())))


def cv_slope(rows: list[dict[str, Any]]) -> float:
    """S5: the slope of log(cv) on log(b) (the spread of the norm normalized to the same mean
    grows with b iff the slope is positive)."""
    return ls_slope([math.log(r["b"]) for r in rows], [_log(r["cv"]) for r in rows])


def common_threshold(by_b: ByB, mode: str) -> float:
    """S7's ONE threshold for every batch size of one (replicate, regime, reading): TAIL_K x
    the RMS of the values pooled over batch sizes, each b weighted equally (so no single b's
    scale sets it)."""
    ms = [ValueStats.from_json(rec["modes"][mode]["values"]).mean_square()
          for rec in by_b.values()]
    ms = [m for m in ms if math.isfinite(m)]
    return TAIL_K * math.sqrt(float(np.mean(ms))) if ms else math.nan


def tail_fractions(by_b: ByB, mode: str, threshold: float) -> tuple[dict[int, float], float]:
    """({b: fraction of the kept trials' values with |value| >= threshold}, the threshold as
    applied: rounded up to the magnitude histogram's next edge, the same for every b)."""
    out, edge = {}, math.nan
    for b, rec in sorted(by_b.items()):
        f, edge = ValueStats.from_json(rec["modes"][mode]["values"]).fraction_above(threshold)
        out[b] = f
    return out, edge


def tail_tau(fractions: dict[int, float]) -> float:
    """S7 tails: Kendall's tau between b and the fraction above the common threshold."""
    bs = sorted(fractions)
    return kendall([float(b) for b in bs], [fractions[b] for b in bs])[0]


def centre_ratio(rows: list[dict[str, Any]]) -> float:
    """S7 centre: median |value| at the largest b / at the smallest b."""
    if len(rows) < 2:
        return math.nan
    lo, hi = rows[0]["median_abs"], rows[-1]["median_abs"]
    return hi / lo if lo > 0 and math.isfinite(hi) else math.nan


def relative_spread(norms: np.ndarray, sets: int, orders: int) -> float:
    """S6: the spread of the norm across sample sets, relative to its mean - the standard
    deviation of the sets' mean norms (each over its orders; diverged trials, NaN, left out)
    over the grand mean. Not a share of variance: a share is 1 by construction at b = n, where
    the order no longer matters. The set means carry the order noise / orders too, which can
    only make small batches look MORE sample-dependent (against the claim)."""
    g = np.asarray(norms, float).reshape(sets, orders)
    means = [float(np.mean(r[np.isfinite(r)])) for r in g if np.isfinite(r).any()]
    if len(means) < 2:
        return math.nan
    grand = float(np.mean(means))
    return float(np.std(means, ddof=1)) / grand if grand > 0 else math.nan


def spread_slope(spreads: dict[int, float]) -> float:
    """S6: the slope of log(relative spread across sets) on log(b)."""
    bs = sorted(spreads)
    return ls_slope([math.log(b) for b in bs], [_log(spreads[b]) for b in bs])


def std_form(bs: list[int], stds: list[float]) -> dict[str, Any]:
    """Open question 1 (descriptive): the functional form of std(norm) vs b. Candidates,
    fitted in log space: power law c b^q, and sqrt(alpha + beta b) (what norm^2 linear in b
    would give). Reports both and the one with the smaller RMS log-residual."""
    pts = [(b, s) for b, s in zip(bs, stds) if math.isfinite(s) and s > 0]
    if len(pts) < 3:
        return {"best": "n/a"}
    b = np.array([p[0] for p in pts], float)
    ls = np.log([p[1] for p in pts])
    pw = stats.linregress(np.log(b), ls)
    rms_pw = float(np.sqrt(np.mean((pw.intercept + pw.slope * np.log(b) - ls) ** 2)))

    def sq(bb, la, lbeta):
        return 0.5 * np.log(np.exp(la) + np.exp(lbeta) * bb)

    try:
        s0 = np.exp(ls)
        p0 = [math.log(max(s0[0] ** 2, 1e-30)), math.log(max(s0[-1] ** 2 / b[-1], 1e-30))]
        with warnings.catch_warnings():  # a degenerate covariance is fine: we use the fit only
            warnings.simplefilter("ignore", optimize.OptimizeWarning)
            (la, lbeta), _ = optimize.curve_fit(sq, b, ls, p0=p0, maxfev=5000)
        rms_sq = float(np.sqrt(np.mean((sq(b, la, lbeta) - ls) ** 2)))
    except (RuntimeError, ValueError):
        la = lbeta = rms_sq = math.nan
    best = "power" if not (rms_sq < rms_pw) else "sqrt(alpha+beta*b)"
    return {"power_q": float(pw.slope), "power_q_se": float(pw.stderr), "power_c":
            float(math.exp(pw.intercept)), "power_rms_log": rms_pw,
            "alpha": float(math.exp(la)) if math.isfinite(la) else math.nan,
            "beta": float(math.exp(lbeta)) if math.isfinite(lbeta) else math.nan,
            "sqrt_rms_log": rms_sq, "best": best}


def decompose(norms: np.ndarray, sets: int, orders: int) -> dict[str, float]:
    """Open question 2 (descriptive): variance of the norm split into 'which samples' vs 'the
    rest', inside one replicate.

    `norms` is [sets, orders]: each row one fixed sample set, shuffled by different seeds.
    Law of total variance: Var = Var_set(E[norm | set]) + E_set[Var(norm | set)]. The
    between-set component is estimated without bias by one-way random-effects ANOVA,
    sigma2_set = max(0, (MS_between - MS_within) / orders). With plain SGD and a fixed set the
    only remaining randomness is the ORDER of the samples; at b = n there is one full-batch
    step and the order only changes float summation, so the within-set part is ~0 there and
    the share is ~1 by construction (which is why S6 is judged on `relative_spread`)."""
    g = np.asarray(norms, float).reshape(sets, orders)
    msw = float(np.mean(np.var(g, axis=1, ddof=1)))
    msb = float(orders * np.var(g.mean(axis=1), ddof=1))
    s2_set = max(0.0, (msb - msw) / orders)
    total = s2_set + msw
    return {"var_samples": s2_set, "var_order": msw, "var_total": total,
            "share_samples": s2_set / total if total > 0 else math.nan}
