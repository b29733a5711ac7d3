"""Rechecking an interval from what claims.json records, and planning what would decide it."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from batchlab.atomic import jsonable
from batchlab.experiments.intervals import (
    INF,
    Interval,
    Pooled,
    Z,
    proportion,
    replicate_mean,
    t_quantile,
)


def interval_json(iv: Interval) -> dict[str, Any]:
    """What claims.json records of an interval besides estimate/ci/n/method."""
    def num(v: float | None) -> float | None:
        return None if v is None else float(v)

    return jsonable({"estimate": num(iv.estimate), "ci": [num(iv.lo), num(iv.hi)], "n": iv.n,
                     "replicates": [num(v) for v in iv.replicates], "spec": iv.spec})


def recompute(replicates: Sequence[float], spec: dict[str, Any]) -> tuple[float, float, float] | None:
    """(estimate, lo, hi) rebuilt from a claim's recorded replicates and spec; None when the
    spec is not a rebuildable kind. Unbounded ends come back as -inf / inf."""
    kind = spec.get("kind")
    if kind == "proportion":
        iv = proportion(int(spec["k"]), int(spec["trials"]))
    elif kind == "mean":
        pooled = spec.get("pooled")
        iv = replicate_mean(list(replicates), known_var=float(spec.get("known_var") or 0.0),
                            floor_var=float(spec.get("floor_var") or 0.0),
                            pooled=Pooled(pooled["var"], pooled["df"]) if pooled else None,
                            clip=tuple(spec["clip"]) if spec.get("clip") else None,
                            df_rule=spec.get("df_rule", "replicates"))
        if spec.get("transform") == "exp":
            iv = iv.map(math.exp)
    elif kind == "hull":
        parts = [recompute(p.get("replicates") or [], p.get("spec") or {}) for p in spec["parts"]]
        if not parts or any(p is None for p in parts):
            return None
        return (float(np.mean([p[0] for p in parts])), min(p[1] for p in parts),
                max(p[2] for p in parts))
    else:
        return None
    return iv.estimate, iv.lo, iv.hi


def replicates_to_decide(iv: Interval, lower: float, upper: float, cap: int = 10_000
                         ) -> dict[str, Any]:
    """How many replicates would decide the claim if the estimate and the per-replicate
    spread stayed as measured: the smallest n whose interval lies wholly inside or wholly
    outside [lower, upper]. The test set's part of the variance does not shrink with more
    seeds; when it alone is too wide, `limited_by` says so and `test_set_factor` says how many
    times larger a test set would have to be."""
    spec = iv.spec
    if spec.get("kind") != "mean" or len(iv.replicates) < 2 or not math.isfinite(iv.estimate):
        return {"replicates": None, "limited_by": "needs at least two replicates to project"}
    reps = np.asarray(iv.replicates, dtype=float)
    m = float(reps.mean())
    var1 = max(float(reps.var(ddof=1)), float(spec.get("floor_var") or 0.0))
    known = float(spec.get("known_var") or 0.0)
    exp = spec.get("transform") == "exp"
    value = math.exp(m) if exp else m
    if lower <= value <= upper:  # inside: the interval must fit inside
        room = [d for d in (m - _inv(lower, exp), _inv(upper, exp) - m) if math.isfinite(d)]
    else:
        room = [abs(m - _inv(lower if value < lower else upper, exp))]
    gap = min(room) if room else INF
    if not gap > 0:
        return {"replicates": None, "limited_by": "the estimate sits on the region's boundary"}
    if known > 0 and Z * math.sqrt(known) >= gap:
        ratio = Z * math.sqrt(known) / gap
        return {"replicates": None, "limited_by": "test set",
                "test_set_factor": math.ceil(ratio**2 * 1.5) if ratio < 1e6 else None}
    def decides(n: int) -> bool:  # the half-width falls with n, so bisection finds the first
        return t_quantile(n - 1) * math.sqrt(var1 / n + known) < gap

    if not decides(cap):
        return {"replicates": None, "limited_by": f"more than {cap} replicates"}
    lo, hi = 1, cap  # decides(hi) holds; decides(lo) is false (n = 1 has no t quantile)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if decides(mid) else (mid, hi)
    return {"replicates": hi, "limited_by": None}


def _inv(bound: float, exp: bool) -> float:
    if exp:
        return math.log(bound) if bound > 0 else -INF
    return bound
