"""Gradient competition, claims: the study's five claims per mode, judged from the measured
norms and fits by the rules in `verdicts.py`."""

from __future__ import annotations

import math

from batchlab.analysis.gradcomp_stats import norms_array
from batchlab.experiments import Claim
from batchlab.experiments.verdicts_legacy import (
    INCONCLUSIVE,
    NOT_REPRODUCED,
    REPRODUCED,
    greater,
    monotone,
)

REGIMES = ("early", "late")


def _combine(verdicts: list[str]) -> str:
    """A claim made for both regimes: reproduced if reproduced in each, not reproduced if
    not reproduced in any, else inconclusive."""
    if verdicts and all(v == REPRODUCED for v in verdicts):
        return REPRODUCED
    return NOT_REPRODUCED if NOT_REPRODUCED in verdicts else INCONCLUSIVE


def _sqrt_verdict(fit: dict[str, float]) -> str:
    lo, hi = fit["ci_low"], fit["ci_high"]
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return INCONCLUSIVE
    if hi < 0.4 or lo > 0.6:
        return NOT_REPRODUCED
    return REPRODUCED if lo >= 0.25 and hi <= 0.75 else INCONCLUSIVE


def claims_for(mode: str, rows: list[dict], fits: dict, recs: dict) -> list[Claim]:
    out = []
    sel = {r: [x for x in rows if x["mode"] == mode and x["regime"] == r and x["kind"] == "norm"]
           for r in REGIMES}

    def trend(col: str, min_effect: float, log: bool, what: str):
        vs, evs, rule = [], {}, ""
        for r in REGIMES:
            xs = [x["b"] for x in sel[r] if math.isfinite(x[col]) and (x[col] > 0 or not log)]
            ys = [math.log(x[col]) if log else x[col] for x in sel[r]
                  if math.isfinite(x[col]) and (x[col] > 0 or not log)]
            if len(xs) < 3:
                vs.append(INCONCLUSIVE)
                continue
            v, ev, rule = monotone(xs, ys, True, min_effect, what)
            vs.append(v)
            evs[f"{r}_rho"], evs[f"{r}_change"] = ev["spearman_rho"], ev["change_first_to_last"]
            evs[f"{r}_verdict"] = v
        return _combine(vs), evs, rule + "; both regimes must agree"

    v, ev, rule = trend("mean", math.log(1.1), True, "log mean summed-gradient norm vs b")
    out.append(Claim(f"{mode}:larger-batch-larger-step",
                     f"[{mode}] larger batches take larger total gradient steps for the same "
                     f"samples", v, ev, rule))
    ev = {f"{r}_{k}": fits[(r, mode)][k] for r in REGIMES
          for k in ("exponent", "ci_low", "ci_high")}
    vs = [_sqrt_verdict(fits[(r, mode)]) for r in REGIMES]
    out.append(Claim(f"{mode}:norm-grows-like-sqrt-b", f"[{mode}] the norm grows like sqrt(b)",
                     _combine(vs), ev,
                     "power-law exponent of mean norm vs b (95% CI = union of regression-SE and "
                     "trial-bootstrap CIs): reproduced if the CI lies within [0.25, 0.75] and "
                     "meets [0.4, 0.6]; not reproduced if it lies entirely outside [0.4, 0.6]; "
                     "both regimes must agree"))
    v, ev, rule = trend("cv", math.log(1.1), True,
                        "log relative spread std/mean (= std normalized to equal mean distance)")
    out.append(Claim(f"{mode}:same-distance-larger-batch-varies-more",
                     f"[{mode}] for the same mean distance, larger batches vary more", v, ev,
                     rule))
    v, ev, rule = trend("kurtosis", 0.5, False, "excess kurtosis of pooled gradient values")
    out.append(Claim(f"{mode}:larger-batch-heavier-tails",
                     f"[{mode}] larger batches have heavier-tailed gradient distributions",
                     v, ev, rule))
    per_b = []
    for b in sorted(recs["early"]):
        if b not in recs["late"]:
            continue
        vb, _, _ = greater(norms_array(recs["early"][b], mode),
                           norms_array(recs["late"][b], mode), 0.0, "early > late")
        per_b.append(vb)
    n_rep, n_not = per_b.count(REPRODUCED), per_b.count(NOT_REPRODUCED)
    v = (REPRODUCED if n_rep == len(per_b) and per_b else
         NOT_REPRODUCED if 2 * n_not >= len(per_b) else INCONCLUSIVE)
    out.append(Claim(f"{mode}:early-larger-than-late",
                     f"[{mode}] early gradients are larger than late ones", v,
                     {"b_reproduced": n_rep, "b_not_reproduced": n_not, "b_total": len(per_b)},
                     "per b: mean early norm > mean late norm by more than 2 x SE over trials; "
                     "reproduced if so at every b, not reproduced if the opposite holds at "
                     "half of the b or more, else inconclusive"))
    return out


