"""Gradient competition, statistics: the power-law fit of the mean norm vs b, the functional
form of std(norm) vs b (open question 1), the sample-vs-order variance decomposition (open
question 2), and the per-(regime, mode, b) table rows. Pure functions of stored trial records.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import numpy as np
from scipy import optimize, stats

from batchlab.analysis.gradcomp_stats import ValueStats, norms_array


def power_fit(bs: list[int], per_b: list[np.ndarray], n_boot: int = 300,
              seed: int = 0) -> dict[str, float]:
    """log(mean norm) = a + p log b by least squares. CI of p two ways: regression standard
    error (t, n-2 dof; covers misfit of the power law) and a bootstrap over trials (covers
    trial noise). The reported `ci_low/ci_high` is the union of both (conservative)."""
    ok = [(b, v) for b, v in zip(bs, per_b) if len(v) >= 2 and np.mean(v) > 0]
    if len(ok) < 3:
        return {"exponent": math.nan, "ci_low": math.nan, "ci_high": math.nan, "r2": math.nan,
                "se": math.nan, "boot_low": math.nan, "boot_high": math.nan, "n_b": len(ok)}
    lb = np.log([b for b, _ in ok])
    lm = np.log([np.mean(v) for _, v in ok])
    fit = stats.linregress(lb, lm)
    t = stats.t.ppf(0.975, len(ok) - 2)
    rng = np.random.default_rng(seed)
    boots = []
    for _ in range(n_boot):
        means = [np.mean(rng.choice(v, size=len(v))) for _, v in ok]
        boots.append(stats.linregress(lb, np.log(means)).slope)
    lo, hi = np.percentile(boots, [2.5, 97.5])
    r_lo, r_hi = fit.slope - t * fit.stderr, fit.slope + t * fit.stderr
    return {"exponent": float(fit.slope), "se": float(fit.stderr), "r2": float(fit.rvalue**2),
            "reg_low": float(r_lo), "reg_high": float(r_hi), "boot_low": float(lo),
            "boot_high": float(hi), "ci_low": float(min(lo, r_lo)),
            "ci_high": float(max(hi, r_hi)), "prefactor": float(math.exp(fit.intercept)),
            "n_b": len(ok)}


def std_form(bs: list[int], stds: list[float]) -> dict[str, Any]:
    """Open question 1: the functional form of std(norm) vs b. Candidates, fitted in log
    space: power law c b^q, and sqrt(alpha + beta b) (what norm^2 linear in b would give).
    Reports both and the one with the smaller RMS log-residual."""
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
    """Open question 2: variance of the norm split into 'which samples' vs 'the rest'.

    `norms` is [sets, orders]: each row one fixed sample set, shuffled by different seeds.
    Law of total variance: Var = Var_set(E[norm | set]) + E_set[Var(norm | set)]. The
    between-set component is estimated without bias by one-way random-effects ANOVA,
    sigma2_set = max(0, (MS_between - MS_within) / orders). With plain SGD and a fixed set the
    only remaining randomness is the ORDER of the samples (which samples share a batch and
    the sequence of steps); at b = n there is one full-batch step and the order only changes
    float summation, so the within-set part is ~0 there by construction."""
    g = np.asarray(norms, float).reshape(sets, orders)
    msw = float(np.mean(np.var(g, axis=1, ddof=1)))
    msb = float(orders * np.var(g.mean(axis=1), ddof=1))
    s2_set = max(0.0, (msb - msw) / orders)
    total = s2_set + msw
    return {"var_samples": s2_set, "var_order": msw, "var_total": total,
            "share_samples": s2_set / total if total > 0 else math.nan}


def tables(recs: dict[str, dict[int, dict]], o: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per (regime, mode, b): norm statistics over finite trials, blow-ups, values."""
    rows = []
    for regime, by_b in recs.items():
        for mode in o["modes"]:
            ref = norms_array(by_b[max(by_b)], mode)
            mu_ref = float(np.mean(ref)) if len(ref) else math.nan
            for b, rec in sorted(by_b.items()):
                v = norms_array(rec, mode)
                mean = float(np.mean(v)) if len(v) else math.nan
                std = float(np.std(v, ddof=1)) if len(v) > 1 else math.nan
                vs = ValueStats.from_json(rec["modes"][mode]["values"]).summary()
                rows.append({
                    "kind": "norm", "regime": regime, "mode": mode, "b": b,
                    "trials": rec["trials"], "blowups": int(sum(rec["modes"][mode]["blowup"])),
                    "mean": mean, "std": std, "cv": std / mean if mean > 0 else math.nan,
                    "norm_mean": mu_ref, "norm_std": std * mu_ref / mean if mean > 0 else math.nan,
                    **vs, "seconds": rec["seconds"], "k": rec["k"],
                    "engine": rec.get("engine", "fused"),
                })
    return rows


