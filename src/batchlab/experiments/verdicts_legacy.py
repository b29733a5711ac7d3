"""Verdict rules: a claim's verdict is a function of measured numbers only.

Each rule returns (verdict, evidence, rule text); the rule text goes into summary.md so a reader
can check the verdict by hand. With several seeds the noise margin is twice the standard error
of the difference of means (about a 95% two-sided band); with one seed it is the stated
minimum effect alone, and the rule text says so.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

REPRODUCED, NOT_REPRODUCED, INCONCLUSIVE = "reproduced", "not_reproduced", "inconclusive"


def _stats(x: Sequence[float]) -> tuple[float, float, int]:
    a = np.asarray([v for v in x if v is not None and math.isfinite(v)], dtype=float)
    if a.size == 0:
        return float("nan"), float("nan"), 0
    sd = float(a.std(ddof=1)) if a.size > 1 else 0.0
    return float(a.mean()), sd, int(a.size)


def noise_margin(a: Sequence[float], b: Sequence[float]) -> float:
    ma, sa, na = _stats(a)
    mb, sb, nb = _stats(b)
    if na < 2 or nb < 2:
        return 0.0
    return 2.0 * math.sqrt(sa**2 / na + sb**2 / nb)


def greater(a: Sequence[float], b: Sequence[float], min_effect: float,
            what: str = "a > b") -> tuple[str, dict, str]:
    """Claim: mean(a) > mean(b). Reproduced if the difference exceeds the margin
    max(min_effect, 2 x SE of the difference); not reproduced if it is below -margin;
    inconclusive in between."""
    ma, sa, na = _stats(a)
    mb, sb, nb = _stats(b)
    margin = max(min_effect, noise_margin(a, b))
    diff = ma - mb
    if not (math.isfinite(ma) and math.isfinite(mb)):
        v = INCONCLUSIVE
    elif diff > margin:
        v = REPRODUCED
    elif diff < -margin:
        v = NOT_REPRODUCED
    else:
        v = INCONCLUSIVE
    ev = {"mean_a": ma, "sd_a": sa, "n_a": na, "mean_b": mb, "sd_b": sb, "n_b": nb,
          "difference": diff, "margin": margin}
    rule = (f"{what}: reproduced if mean difference > margin = max({min_effect:g}, "
            f"2 x standard error over seeds); not reproduced if < -margin; else inconclusive")
    return v, ev, rule


def _band(deviation: float, limit: float) -> str:
    """Reproduced within `limit`, not reproduced beyond twice it, inconclusive in between
    (the gap keeps a verdict from flipping on noise at the boundary)."""
    if deviation <= limit:
        return REPRODUCED
    return NOT_REPRODUCED if deviation > 2 * limit else INCONCLUSIVE


def close_to(a: Sequence[float], b: Sequence[float], tolerance: float,
             what: str = "a ~ b") -> tuple[str, dict, str]:
    """Claim: a reaches b (a >= b - tolerance, within noise). Reproduced if
    mean(a) >= mean(b) - tolerance - noise; not reproduced if mean(a) < mean(b) - 2 x
    (tolerance + noise); inconclusive in between."""
    ma, sa, na = _stats(a)
    mb, sb, nb = _stats(b)
    noise = noise_margin(a, b)
    gap = mb - ma
    v = _band(gap, tolerance + noise) if math.isfinite(ma) and math.isfinite(mb) else INCONCLUSIVE
    ev = {"mean_a": ma, "sd_a": sa, "n_a": na, "mean_b": mb, "sd_b": sb, "n_b": nb,
          "shortfall": gap, "tolerance": tolerance, "noise": noise}
    rule = (f"{what}: reproduced if mean(a) falls short of mean(b) by at most "
            f"{tolerance:g} + 2 x SE; not reproduced if by more than twice that; else inconclusive")
    return v, ev, rule


def monotone(xs: Sequence[float], ys: Sequence[float], increasing: bool, min_effect: float,
             what: str = "trend") -> tuple[str, dict, str]:
    """Claim: y changes monotonically with x. Uses Spearman's rank correlation and the
    end-to-end change: reproduced if rho has the claimed sign with |rho| >= 0.8 and the change
    from the first to the last point exceeds min_effect in that direction; not reproduced if
    the end-to-end change exceeds min_effect in the other direction; else inconclusive."""
    from scipy.stats import spearmanr

    x = np.asarray(xs, dtype=float)
    y = np.asarray(ys, dtype=float)
    order = np.argsort(x)
    x, y = x[order], y[order]
    rho = float(spearmanr(x, y).statistic) if len(x) > 2 else float(np.sign(y[-1] - y[0]))
    change = float(y[-1] - y[0])
    sign = 1 if increasing else -1
    if sign * rho >= 0.8 and sign * change > min_effect:
        v = REPRODUCED
    elif -sign * change > min_effect:
        v = NOT_REPRODUCED
    else:
        v = INCONCLUSIVE
    ev = {"spearman_rho": rho, "change_first_to_last": change, "x": x.tolist(), "y": y.tolist()}
    direction = "increasing" if increasing else "decreasing"
    rule = (f"{what} {direction}: reproduced if Spearman rho has that sign with |rho| >= 0.8 and "
            f"the first-to-last change exceeds {min_effect:g}; not reproduced if it changes by "
            f"more than {min_effect:g} the other way; else inconclusive")
    return v, ev, rule


def within(a: Sequence[float], target: float, tolerance: float,
           what: str = "a ~ target") -> tuple[str, dict, str]:
    """Claim: a equals `target` up to `tolerance` (two-sided). Reproduced if
    |mean(a) - target| <= tolerance + noise (noise = 2 x standard error of the mean); not
    reproduced if it exceeds twice that; inconclusive in between."""
    ma, sa, na = _stats(a)
    noise = 2.0 * sa / math.sqrt(na) if na > 1 else 0.0
    dev = abs(ma - target)
    v = _band(dev, tolerance + noise) if math.isfinite(ma) else INCONCLUSIVE
    ev = {"mean": ma, "sd": sa, "n": na, "target": target, "deviation": dev,
          "tolerance": tolerance, "noise": noise}
    rule = (f"{what}: reproduced if the mean is within {tolerance:g} + 2 x SE of {target:g}; "
            f"not reproduced if it is off by more than twice that; else inconclusive")
    return v, ev, rule


def correlated(xs: Sequence[float], ys: Sequence[float], positive: bool = True,
               min_rho: float = 0.5, what: str = "x and y") -> tuple[str, dict, str]:
    """Claim: y rises (or falls) with x across many points. Spearman's rank correlation over
    the finite pairs: reproduced if rho has the claimed sign, |rho| >= min_rho and p < 0.05;
    not reproduced if rho has the wrong sign (or is zero) ; else inconclusive."""
    from scipy.stats import spearmanr

    x = np.asarray(xs, dtype=float)
    y = np.asarray(ys, dtype=float)
    ok = np.isfinite(x) & np.isfinite(y)
    x, y = x[ok], y[ok]
    sign = 1 if positive else -1
    if len(x) >= 3 and np.ptp(x) > 0 and np.ptp(y) > 0:
        res = spearmanr(x, y)
        rho, p = float(res.statistic), float(res.pvalue)
    else:
        rho, p = float("nan"), float("nan")
    if not math.isfinite(rho):
        v = INCONCLUSIVE
    elif sign * rho >= min_rho and p < 0.05:
        v = REPRODUCED
    elif sign * rho <= 0:
        v = NOT_REPRODUCED
    else:
        v = INCONCLUSIVE
    ev = {"spearman_rho": rho, "p_value": p, "n_points": int(len(x))}
    direction = "positive" if positive else "negative"
    rule = (f"{what}: Spearman rank correlation over the {len(x)} finite points; reproduced if "
            f"rho is {direction} with |rho| >= {min_rho:g} and p < 0.05; not reproduced if rho "
            f"has the other sign or is zero; else inconclusive")
    return v, ev, rule


def combine(verdicts: Sequence[str]) -> str:
    """A claim made of parts: reproduced if every part is, not reproduced if any part is not,
    else inconclusive."""
    if verdicts and all(v == REPRODUCED for v in verdicts):
        return REPRODUCED
    if any(v == NOT_REPRODUCED for v in verdicts):
        return NOT_REPRODUCED
    return INCONCLUSIVE
