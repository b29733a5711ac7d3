"""The study's gradient-competition findings (S4-S8, S15) as claims, per reading.

The source does not say whether its "summed gradient" is of a mean- or a sum-reduced loss, so
every claim is made in each of the three modes of `batchlab.analysis.gradcomp`
(`displacement`: the weights' distance moved, = lr x the sum of mean-loss gradients;
`sample-sum`: the sum of per-sample gradients; `sum-loss`: the sum of sum-reduced batch
gradients). The verdict on the study's own words rests on ONE reading, the one its text
describes ("the norm as the distance between weights"): `displacement` claims are primary,
the other two secondary. Both checkpoints (early, late) must agree: a claim's interval is the
hull of the two regimes' intervals, so it is reproduced only if both lie in the region and
not reproduced only if both lie outside it on the same side.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from batchlab.experiments import verdicts as V
from batchlab.experiments.claims import Claim

PRIMARY_MODE = "displacement"
READINGS = {
    "displacement": "the norm of the weights' displacement (mean-reduced loss), the study's own "
                    "description: the distance between weights",
    "sample-sum": "the norm of the sum of per-sample gradients",
    "sum-loss": "the norm of the summed batch gradients of a sum-reduced loss",
}
REGIMES = ("early", "late")


def hull(parts: list[V.Interval], what: str) -> V.Interval:
    """The smallest interval containing every part (NaN if any part is unmeasured)."""
    if not parts or any(math.isnan(p.lo) or math.isnan(p.hi) for p in parts):
        return V.nan_interval(f"hull over {what}")
    return V.Interval(float(np.mean([p.estimate for p in parts])), min(p.lo for p in parts),
                      max(p.hi for p in parts), min(p.n for p in parts),
                      f"hull of the {what} intervals ({parts[0].method})")


def _fit_interval(fit: dict[str, float], trials: int) -> V.Interval:
    return V.Interval(fit["exponent"], fit["ci_low"], fit["ci_high"], trials,
                      "power-law fit, 95% CI = union of regression-SE and trial-bootstrap CIs")


def claims_for(mode: str, rows: list[dict[str, Any]], fits: dict[tuple[str, str], dict[str, float]],
               recs: dict[str, dict[int, dict[str, Any]]],
               norms: Any) -> list[Claim]:
    """Claims of one reading. `norms(rec, mode)` gives a record's per-trial norms."""
    primary = mode == PRIMARY_MODE
    tag = dict(reading=READINGS.get(mode, mode), primary=primary)
    trials = min((rec["trials"] for by_b in recs.values() for rec in by_b.values()), default=0)
    sel = {r: sorted((x for x in rows if x.get("kind") == "norm" and x["mode"] == mode
                      and x["regime"] == r), key=lambda x: x["b"]) for r in REGIMES}
    expo = hull([_fit_interval(fits[(r, mode)], trials) for r in REGIMES if (r, mode) in fits],
                "early and late")
    out = [
        Claim(f"{mode}:larger-batch-larger-step", "S4", f"[{mode}] for the same samples, larger "
              "batches make larger total gradient steps", expo, V.above(0.0),
              "exponent p of mean norm ~ b^p (both checkpoints)", {"fits": _fits(fits, mode)}, **tag),
        Claim(f"{mode}:norm-grows-like-sqrt-b", "S4", f"[{mode}] the summed-gradient norm grows "
              "like sqrt(b)", expo, V.between(0.35, 0.65),
              "exponent p of mean norm ~ b^p (both checkpoints; sqrt = 0.5 +- 0.15)",
              {"fits": _fits(fits, mode)}, **tag),
        Claim(f"{mode}:competition", "S15", f"[{mode}] samples compete: one large-batch step is "
              "shorter than the many small steps over the same samples", expo, V.below(0.0),
              "exponent p of mean norm ~ b^p (the hypothesis: the norm falls with b)",
              {"fits": _fits(fits, mode)}, **tag),
    ]

    def trend(col: str) -> V.Interval:
        parts = []
        for r in REGIMES:
            pts = [(x["b"], x[col]) for x in sel[r] if x.get(col) is not None and math.isfinite(x[col])]
            parts.append(V.correlation([p[0] for p in pts], [p[1] for p in pts]))
        return hull(parts, "early and late")

    out.append(Claim(f"{mode}:same-distance-larger-batch-varies-more", "S5", f"[{mode}] normalized "
                     "to the same mean, larger batches spread more across trials", trend("cv"),
                     V.above(0.5), "Spearman rho(b, std/mean of the norm) per checkpoint",
                     {r: [(x["b"], x["cv"]) for x in sel[r]] for r in REGIMES}, **tag))
    dec = [x for x in rows if x.get("kind") == "decomposition" and x["mode"] == mode
           and x.get("share_samples") is not None and math.isfinite(x["share_samples"])]
    out.append(Claim(f"{mode}:which-samples-matter-at-large-b", "S6", f"[{mode}] with a large batch "
                     "the update size depends on which samples are drawn, with a small batch "
                     "much less", V.correlation([x["b"] for x in dec], [x["share_samples"] for x in dec]),
                     V.above(0.5), "Spearman rho(b, share of the norm's variance due to the sample "
                     "set) over checkpoints and batch sizes",
                     {"decomposition": [(x["regime"], x["b"], x["share_samples"]) for x in dec]}, **tag))
    out.append(Claim(f"{mode}:larger-batch-heavier-tails", "S7", f"[{mode}] larger batches have "
                     "heavier-tailed gradient values", trend("tail_fraction"), V.above(0.5),
                     "Spearman rho(b, fraction of values beyond 4 x the scale) per checkpoint",
                     {r: [(x["b"], x["tail_fraction"]) for x in sel[r]] for r in REGIMES}, **tag))
    centre = []
    for r in REGIMES:
        if len(sel[r]) >= 2 and sel[r][0]["value_rms"] > 0:
            centre.append(sel[r][-1]["value_rms"] / sel[r][0]["value_rms"])
    out.append(Claim(f"{mode}:centre-similar", "S7", f"[{mode}] the centre of the value "
                     "distribution is similar across batch sizes (rms within a factor 2)",
                     hull([V.Interval(c, c, c, 1, "one ratio per checkpoint") for c in centre],
                          "early and late") if len(centre) == 2 else V.nan_interval("rms ratio"),
                     V.between(0.5, 2.0), "rms of the values at the largest / smallest b",
                     {"ratios": centre}, **tag))
    parts = []
    for b in sorted(set(recs.get("early", {})) & set(recs.get("late", {}))):
        parts.append(V.ratio(norms(recs["early"][b], mode), norms(recs["late"][b], mode)))
    out.append(Claim(f"{mode}:early-larger-than-late", "S8", f"[{mode}] gradients are larger early "
                     "in training than late, at every b", V.all_of(parts) if parts else
                     V.nan_interval("ratio"), V.above(1.0),
                     "mean early / mean late norm, the smallest over b (all must exceed 1)",
                     {"b": sorted(set(recs.get("early", {})) & set(recs.get("late", {})))}, **tag))
    return out


def _fits(fits: dict[tuple[str, str], dict[str, float]], mode: str) -> dict[str, Any]:
    return {r: {k: fits[(r, mode)][k] for k in ("exponent", "ci_low", "ci_high")}
            for r in REGIMES if (r, mode) in fits}
