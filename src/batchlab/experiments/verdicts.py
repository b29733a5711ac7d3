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
from dataclasses import dataclass
from typing import Any

REPRODUCED, NOT_REPRODUCED, INCONCLUSIVE = "reproduced", "not_reproduced", "inconclusive"
UNTESTABLE = "untestable"
VERDICTS = (REPRODUCED, NOT_REPRODUCED, INCONCLUSIVE, UNTESTABLE)
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
