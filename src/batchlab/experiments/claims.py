"""Claims and the versioned `claims.json` schema.

A `Claim` is built from an `Interval` (measured) and a `Region` (what the source claims); its
verdict is computed by `verdicts.decide` in the constructor, so no code path can write a
verdict by hand. `claims_document` wraps a list of claims in the versioned document, and
`check_document` validates a document against the JSON Schema and rechecks every verdict from
its `ci` and `region` alone - exactly what a reader of the file can do.

Schema (version 2), one object per claim:
    id        unique claim id within the document (e.g. "bs-test-acc")
    finding   ids of ../shared/study/FINDINGS.md it tests, comma-separated ("S1" or "S9,S10")
    claim     the claim in words
    verdict   "reproduced" | "not_reproduced" | "inconclusive"
    estimate  point estimate of the quantity (number; null if it could not be measured)
    ci        [lo, hi], the 95% interval, lo < hi (null for an unbounded end)
    region    {"above": t} | {"below": t} | {"between": [lo, hi]} - where the claim puts it
    n         seeds or trials behind the interval
    method    how the interval was obtained
    rule      the decision rule and the quantity, in plain words
    evidence  the inputs (per-seed values, settings)
    reading   (optional) which reading of an ambiguous source the claim tests
    primary   (optional) true for the claim a finding's verdict rests on, false for others
    experiment (added by `reproduce`) the experiment that produced it
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

from batchlab.experiments.verdicts import (
    INCONCLUSIVE,
    VERDICTS,
    Interval,
    Region,
    decide,
)

SCHEMA_VERSION = 2
SCHEMA_NAME = "batchlab-claims"

RULE = ("reproduced iff the whole 95% interval lies in the region; not_reproduced iff it lies "
        "wholly outside; else inconclusive")

_NUM_OR_NULL = {"type": ["number", "null"]}
JSON_SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "title": "batchlab claims.json, version 2",
    "type": "object",
    "required": ["schema", "version", "claims"],
    "properties": {
        "schema": {"const": SCHEMA_NAME},
        "version": {"const": SCHEMA_VERSION},
        "claims": {"type": "array", "items": {"$ref": "#/$defs/claim"}},
    },
    "$defs": {
        "claim": {
            "type": "object",
            "required": ["id", "finding", "claim", "verdict", "estimate", "ci", "region", "n",
                         "method", "rule", "evidence"],
            "properties": {
                "id": {"type": "string", "minLength": 1},
                "finding": {"type": "string", "pattern": r"^[SKCPGR][0-9]+(,[SKCPGR][0-9]+)*$"},
                "claim": {"type": "string", "minLength": 1},
                "verdict": {"enum": list(VERDICTS)},
                "estimate": _NUM_OR_NULL,
                "ci": {"type": "array", "minItems": 2, "maxItems": 2, "items": _NUM_OR_NULL},
                "region": {
                    "oneOf": [
                        {"type": "object", "required": ["above"], "additionalProperties": False,
                         "properties": {"above": {"type": "number"}}},
                        {"type": "object", "required": ["below"], "additionalProperties": False,
                         "properties": {"below": {"type": "number"}}},
                        {"type": "object", "required": ["between"], "additionalProperties": False,
                         "properties": {"between": {"type": "array", "minItems": 2, "maxItems": 2,
                                                    "items": {"type": "number"}}}},
                    ]
                },
                "n": {"type": "integer", "minimum": 0},
                "method": {"type": "string"},
                "rule": {"type": "string"},
                "evidence": {"type": "object"},
                "reading": {"type": "string"},
                "primary": {"type": "boolean"},
                "experiment": {"type": "string"},
            },
        }
    },
}


def jsonable(v: Any) -> Any:
    """Non-finite floats -> None (JSON has no NaN/inf); numpy scalars -> Python numbers."""
    if isinstance(v, dict):
        return {str(k): jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [jsonable(x) for x in v]
    if hasattr(v, "item") and callable(v.item) and getattr(v, "ndim", 1) == 0:
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


@dataclass
class Claim:
    """One tested claim. The verdict follows from `interval` and `region`; never pass one."""

    id: str
    finding: str
    claim: str
    interval: Interval
    region: Region
    quantity: str
    evidence: dict[str, Any] = field(default_factory=dict)
    reading: str | None = None
    primary: bool | None = None
    verdict: str = field(init=False)

    def __post_init__(self) -> None:
        iv = self.interval
        if iv.lo == iv.hi and math.isfinite(iv.lo):
            # a spread of exactly zero (e.g. a quantity that does not depend on the seed): widen
            # by rounding resolution so lo < hi holds; widening can only make a verdict weaker
            eps = max(1e-12, 1e-9 * abs(iv.lo))
            iv = self.interval = Interval(iv.estimate, iv.lo - eps, iv.hi + eps, iv.n, iv.method)
        self.verdict = decide(iv.lo, iv.hi, self.region, iv.estimate)
        if not math.isfinite(iv.estimate):
            self.verdict = INCONCLUSIVE

    @property
    def rule(self) -> str:
        return f"{self.quantity} {self.region.describe()}: {RULE}"

    def to_json(self) -> dict[str, Any]:
        iv = self.interval
        lo = None if math.isnan(iv.lo) or iv.lo == -math.inf else iv.lo
        hi = None if math.isnan(iv.hi) or iv.hi == math.inf else iv.hi
        d: dict[str, Any] = {
            "id": self.id, "finding": self.finding, "claim": self.claim, "verdict": self.verdict,
            "estimate": jsonable(iv.estimate), "ci": [lo, hi], "region": self.region.to_json(),
            "n": int(iv.n), "method": iv.method, "rule": self.rule,
            "evidence": jsonable(self.evidence),
        }
        if self.reading is not None:
            d["reading"] = self.reading
        if self.primary is not None:
            d["primary"] = self.primary
        return d


def claims_document(claims: list[dict[str, Any]]) -> dict[str, Any]:
    return {"schema": SCHEMA_NAME, "version": SCHEMA_VERSION, "claims": claims}


def dumps(claims: list[dict[str, Any]]) -> str:
    """The document as strict JSON (raises on NaN rather than writing it)."""
    return json.dumps(claims_document(jsonable(claims)), indent=2, allow_nan=False)


def recheck(c: dict[str, Any]) -> str:
    """The verdict a reader computes from one claim object's `ci` and `region` alone."""
    lo, hi = c["ci"]
    lo = -math.inf if lo is None else lo
    hi = math.inf if hi is None else hi
    if c.get("estimate") is None:
        return INCONCLUSIVE
    return decide(lo, hi, Region.from_json(c["region"]))


def check_document(doc: Any) -> list[str]:
    """Problems with a claims.json document: schema violations, lo >= hi, verdicts that do not
    follow from ci and region, duplicate ids. An empty list means valid."""
    import jsonschema

    problems = [f"{'/'.join(map(str, e.path)) or 'document'}: {e.message}"
                for e in jsonschema.Draft202012Validator(JSON_SCHEMA).iter_errors(doc)]
    if problems:
        return problems
    seen: set[str] = set()
    for c in doc["claims"]:
        key = f"{c.get('experiment', '')}/{c['id']}"
        if key in seen:
            problems.append(f"{c['id']}: duplicate id")
        seen.add(key)
        lo, hi = c["ci"]
        if lo is not None and hi is not None and not lo < hi:
            problems.append(f"{c['id']}: ci lo {lo} is not below hi {hi}")
        want = recheck(c)
        if want != c["verdict"]:
            problems.append(f"{c['id']}: verdict {c['verdict']} does not follow from ci and "
                            f"region (rule gives {want})")
    return problems
