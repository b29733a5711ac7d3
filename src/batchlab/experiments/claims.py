"""Claims and the versioned `claims.json` schema (version 3).

A `Claim` is built from an `Interval` (measured over independent replicates, see
`intervals.py`) and a `Region` (what the source claims); its verdict is computed in the
constructor, so no code path can write one by hand. Four outcomes:

- reproduced / not_reproduced / inconclusive: the interval against the region (`decide`);
- untestable, with a machine-readable `reason`:
  - `regime`: a premise of the claim does not hold at the budget run (a `Gate`: arms not
    converged, train accuracies not comparable); the gate's own interval is recorded;
  - `construction`: the claim holds by construction (an identity, a design constant, sampling
    theory); it is shown as a check and never counted as evidence for a source;
  - `zero-width`: every replicate gave the same value, so the interval has no width;
  - `unmeasured`: the quantity could not be measured at this budget (no estimate).

`check_document` validates a document against the JSON Schema and rechecks everything from
the file alone: each interval is rebuilt from its recorded per-replicate values and spec
(`interval_audit.recompute`), `n` is the number of those replicates, every gate is re-decided, and
every verdict and reason must follow.

Schema (version 3), one object per claim:
    id         unique claim id within the document (e.g. "bs-test-acc")
    finding    ids of the findings catalogue it tests, comma-separated ("S1" or "S9,S10")
    claim      the claim in words
    verdict    "reproduced" | "not_reproduced" | "inconclusive" | "untestable"
    reason     (untestable only) {"code": "regime"|"construction"|"zero-width"|"unmeasured",
               "text": ...}; construction reasons add "check": what the interval says
    estimate   point estimate of the quantity (null if it could not be measured)
    ci         [lo, hi], the 95% interval (null for an unbounded end)
    region     {"above": t} | {"below": t} | {"between": [lo, hi]} - where the claim puts it
    n          the number of independent replicates (training seeds) behind the interval
    replicates the per-replicate values the interval came from (len == n)
    spec       how the interval was built from them (kind, known and floor variance, df, ...)
    gates      the premises checked first: [{name, quantity, estimate, ci, region, passed,
               replicates, spec}]
    to_decide  (inconclusive only) replicates that would decide it at the measured spread, or
               what limits it ({"replicates": n | null, "limited_by": ...})
    method, rule, evidence, reading, primary, experiment: as in version 2
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from batchlab.atomic import jsonable, to_json
from batchlab.experiments.interval_audit import recompute, replicates_to_decide
from batchlab.experiments.intervals import Interval
from batchlab.experiments.verdicts import (
    INCONCLUSIVE,
    REPRODUCED,
    UNTESTABLE,
    VERDICTS,
    Region,
    decide,
)

SCHEMA_VERSION = 3
SCHEMA_NAME = "batchlab-claims"
REASONS = ("regime", "construction", "zero-width", "unmeasured")
CATALOGUE = "docs/findings.md"
"""Where the findings catalogue lives in the project (the ids of `finding` point there)."""

RULE = ("reproduced iff the whole 95% interval lies in the region; not_reproduced iff it lies "
        "wholly outside; else inconclusive; untestable when a premise fails, the claim holds "
        "by construction, the interval has zero width or nothing was measured")

_NUM_OR_NULL = {"type": ["number", "null"]}
_REGION = {
    "oneOf": [
        {"type": "object", "required": ["above"], "additionalProperties": False,
         "properties": {"above": {"type": "number"}}},
        {"type": "object", "required": ["below"], "additionalProperties": False,
         "properties": {"below": {"type": "number"}}},
        {"type": "object", "required": ["between"], "additionalProperties": False,
         "properties": {"between": {"type": "array", "minItems": 2, "maxItems": 2,
                                    "items": {"type": "number"}}}},
    ]
}
_CI = {"type": "array", "minItems": 2, "maxItems": 2, "items": _NUM_OR_NULL}
JSON_SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "title": "batchlab claims.json, version 3",
    "type": "object",
    "required": ["schema", "version", "claims"],
    "properties": {
        "schema": {"const": SCHEMA_NAME},
        "version": {"const": SCHEMA_VERSION},
        "catalogue": {"type": "string"},
        "claims": {"type": "array", "items": {"$ref": "#/$defs/claim"}},
    },
    "$defs": {
        "gate": {
            "type": "object",
            "required": ["name", "quantity", "estimate", "ci", "region", "passed", "replicates",
                         "spec"],
            "properties": {"name": {"type": "string"}, "quantity": {"type": "string"},
                           "estimate": _NUM_OR_NULL, "ci": _CI, "region": _REGION,
                           "passed": {"type": "boolean"},
                           "replicates": {"type": "array", "items": _NUM_OR_NULL},
                           "spec": {"type": "object"}},
        },
        "claim": {
            "type": "object",
            "required": ["id", "finding", "claim", "verdict", "estimate", "ci", "region", "n",
                         "replicates", "spec", "method", "rule", "evidence"],
            "properties": {
                "id": {"type": "string", "minLength": 1},
                "finding": {"type": "string", "pattern": r"^[SKCPGR][0-9]+(,[SKCPGR][0-9]+)*$"},
                "claim": {"type": "string", "minLength": 1},
                "verdict": {"enum": list(VERDICTS)},
                "reason": {"type": "object", "required": ["code", "text"],
                           "properties": {"code": {"enum": list(REASONS)},
                                          "text": {"type": "string"},
                                          "check": {"type": "string"}}},
                "estimate": _NUM_OR_NULL,
                "ci": _CI,
                "region": _REGION,
                "n": {"type": "integer", "minimum": 0},
                "replicates": {"type": "array", "items": _NUM_OR_NULL},
                "spec": {"type": "object"},
                "gates": {"type": "array", "items": {"$ref": "#/$defs/gate"}},
                "to_decide": {"type": "object"},
                "method": {"type": "string"},
                "rule": {"type": "string"},
                "evidence": {"type": "object"},
                "reading": {"type": "string"},
                "primary": {"type": "boolean"},
                "experiment": {"type": "string"},
            },
        },
    },
}


def _ci(iv: Interval) -> list[float | None]:
    return [None if math.isnan(iv.lo) or iv.lo == -math.inf else iv.lo,
            None if math.isnan(iv.hi) or iv.hi == math.inf else iv.hi]


@dataclass(frozen=True)
class Gate:
    """A premise a claim needs at the budget run, itself an interval against a region: it
    passes only if its whole interval lies in the region (noise can only fail a gate, and a
    failed gate makes the claim untestable, never decided)."""

    name: str
    quantity: str
    interval: Interval
    region: Region

    @property
    def passed(self) -> bool:
        return gate_passes(self.interval.lo, self.interval.hi, self.region,
                           self.interval.estimate)

    def to_json(self) -> dict[str, Any]:
        iv = self.interval
        return {"name": self.name, "quantity": self.quantity, "estimate": jsonable(iv.estimate),
                "ci": _ci(iv), "region": self.region.to_json(), "passed": self.passed,
                "replicates": jsonable(list(iv.replicates)), "spec": jsonable(iv.spec)}


def gate_passes(lo: float, hi: float, region: Region, estimate: float) -> bool:
    """A gate's rule (also used by `check_document`)."""
    if not math.isfinite(estimate):
        return False
    return decide(lo, hi, region, estimate) == REPRODUCED


def outcome(iv_lo: float, iv_hi: float, estimate: float, region: Region, gates_ok: bool,
            construction: bool) -> tuple[str, str | None]:
    """(verdict, reason code) - the whole rule, in the order a reader applies it."""
    if construction:
        return UNTESTABLE, "construction"
    if not gates_ok:
        return UNTESTABLE, "regime"
    if not math.isfinite(estimate):
        return UNTESTABLE, "unmeasured"
    if math.isfinite(iv_lo) and iv_lo == iv_hi:
        return UNTESTABLE, "zero-width"
    return decide(iv_lo, iv_hi, region, estimate), None


@dataclass
class Claim:
    """One tested claim. The verdict follows from `interval`, `region`, `gates` and
    `construction`; never pass one."""

    id: str
    finding: str
    claim: str
    interval: Interval
    region: Region
    quantity: str
    evidence: dict[str, Any] = field(default_factory=dict)
    reading: str | None = None
    primary: bool | None = None
    gates: list[Gate] = field(default_factory=list)
    construction: str | None = None  # why it holds by construction (then: untestable, a check)
    verdict: str = field(init=False)
    reason: dict[str, str] | None = field(init=False, default=None)

    def __post_init__(self) -> None:
        iv = self.interval
        failed = [g for g in self.gates if not g.passed]
        self.verdict, code = outcome(iv.lo, iv.hi, iv.estimate, self.region, not failed,
                                     self.construction is not None)
        if code == "construction":
            check = decide(iv.lo, iv.hi, self.region, iv.estimate)
            self.reason = {"code": code, "text": str(self.construction),
                           "check": {"reproduced": "holds", "not_reproduced": "fails"}.get(
                               check, "undecided")}
        elif code == "regime":
            self.reason = {"code": code, "text": "; ".join(
                f"premise '{g.name}' not met at this budget: {g.quantity} = "
                f"{_fmt(g.interval.estimate)} [{_fmt(g.interval.lo)}, {_fmt(g.interval.hi)}], "
                f"needed {g.region.describe()}" for g in failed)}
        elif code == "unmeasured":
            self.reason = {"code": code, "text": f"no estimate at this budget ({iv.method})"}
        elif code == "zero-width":
            self.reason = {"code": code, "text": f"all {iv.n} replicates gave the same value "
                           f"{_fmt(iv.estimate)}: an interval of zero width cannot decide"}

    @property
    def rule(self) -> str:
        return f"{self.quantity} {self.region.describe()}: {RULE}"

    def to_json(self) -> dict[str, Any]:
        iv = self.interval
        d: dict[str, Any] = {
            "id": self.id, "finding": self.finding, "claim": self.claim, "verdict": self.verdict,
            "estimate": jsonable(iv.estimate), "ci": _ci(iv), "region": self.region.to_json(),
            "n": int(iv.n), "replicates": jsonable(list(iv.replicates)),
            "spec": jsonable(iv.spec), "method": iv.method, "rule": self.rule,
            "evidence": jsonable(self.evidence),
        }
        if self.reason is not None:
            d["reason"] = dict(self.reason)
        if self.gates:
            d["gates"] = [g.to_json() for g in self.gates]
        if self.verdict == INCONCLUSIVE and iv.spec.get("kind") == "mean":
            d["to_decide"] = jsonable(replicates_to_decide(iv, self.region.lower,
                                                           self.region.upper))
        if self.reading is not None:
            d["reading"] = self.reading
        if self.primary is not None:
            d["primary"] = self.primary
        return d


def _fmt(v: float) -> str:
    return f"{v:.4g}" if math.isfinite(v) else ("-inf" if v == -math.inf else
                                                 "inf" if v == math.inf else "n/a")


def claims_document(claims: list[dict[str, Any]]) -> dict[str, Any]:
    return {"schema": SCHEMA_NAME, "version": SCHEMA_VERSION, "catalogue": CATALOGUE,
            "claims": claims}


def dumps(claims: list[dict[str, Any]]) -> str:
    """The document as strict JSON (raises on NaN rather than writing it)."""
    return to_json(claims_document(claims), indent=2)


def _bounds(ci: list[float | None]) -> tuple[float, float]:
    lo, hi = ci
    return (-math.inf if lo is None else lo), (math.inf if hi is None else hi)


def recheck(c: dict[str, Any]) -> tuple[str, str | None]:
    """The (verdict, reason code) a reader computes from one claim object alone."""
    lo, hi = _bounds(c["ci"])
    gates_ok = all(gate_passes(*_bounds(g["ci"]), Region.from_json(g["region"]),
                               math.nan if g["estimate"] is None else g["estimate"])
                   for g in c.get("gates", []))
    construction = (c.get("reason") or {}).get("code") == "construction"
    est = math.nan if c.get("estimate") is None else c["estimate"]
    return outcome(lo, hi, est, Region.from_json(c["region"]), gates_ok, construction)


def _same(a: float | None, b: float) -> bool:
    if a is None:
        return not math.isfinite(b)
    return math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-9)


def _recheck_interval(c: dict[str, Any], where: str) -> list[str]:
    """The interval rebuilt from the recorded replicates and spec must be the recorded one."""
    spec, reps = c.get("spec") or {}, c.get("replicates") or []
    if spec.get("kind") not in ("mean", "proportion", "hull"):
        return []
    problems = []
    if spec.get("kind") != "hull" and c["n"] != len(reps):
        problems.append(f"{where}: n = {c['n']} but {len(reps)} replicates are recorded")
    if any(r is None for r in reps):
        return problems + [f"{where}: a recorded replicate is not a finite number"]
    got = recompute(reps, spec)
    if got is None:
        return problems
    est, lo, hi = got
    (clo, chi), cest = c["ci"], c["estimate"]
    if not (_same(cest, est) and _same(clo, lo) and _same(chi, hi)):
        problems.append(f"{where}: the interval does not follow from its replicates and spec "
                        f"(recorded {cest} [{clo}, {chi}], rebuilt {est:.6g} [{lo:.6g}, {hi:.6g}])")
    return problems


def check_document(doc: Any) -> list[str]:
    """Problems with a claims.json document: schema violations, intervals that do not follow
    from their replicates, lo > hi, gates and verdicts that do not follow, duplicate ids.
    An empty list means valid."""
    problems = schema_problems(doc)
    if problems:
        return problems
    seen: set[str] = set()
    for c in doc["claims"]:
        key = f"{c.get('experiment', '')}/{c['id']}"
        if key in seen:
            problems.append(f"{c['id']}: duplicate id")
        seen.add(key)
        lo, hi = c["ci"]
        if lo is not None and hi is not None and lo > hi:
            problems.append(f"{c['id']}: ci lo {lo} is above hi {hi}")
        problems += _recheck_interval(c, c["id"])
        for g in c.get("gates", []):
            problems += _recheck_interval({**g, "n": len(g["replicates"])}, f"{c['id']} gate {g['name']}")
            ok = gate_passes(*_bounds(g["ci"]), Region.from_json(g["region"]),
                             math.nan if g["estimate"] is None else g["estimate"])
            if ok != g["passed"]:
                problems.append(f"{c['id']}: gate {g['name']} says passed={g['passed']} but its "
                                f"interval gives {ok}")
        want, code = recheck(c)
        if want != c["verdict"]:
            problems.append(f"{c['id']}: verdict {c['verdict']} does not follow from ci, region "
                            f"and gates (rule gives {want})")
        got_code = (c.get("reason") or {}).get("code")
        if c["verdict"] == UNTESTABLE and got_code != code:
            problems.append(f"{c['id']}: untestable with reason {got_code!r}, rule gives {code!r}")
        if c["verdict"] != UNTESTABLE and c.get("reason") is not None:
            problems.append(f"{c['id']}: a reason is given but the verdict is {c['verdict']}")
    return problems


def schema_problems(doc: Any) -> list[str]:
    """JSON Schema violations (jsonschema when installed, else `claims_schema`'s own check of
    the same schema)."""
    try:
        import jsonschema
    except ImportError:  # an optional dependency: the built-in validator covers this schema
        from batchlab.experiments.claims_schema import validate

        return validate(doc, JSON_SCHEMA)
    return [f"{'/'.join(map(str, e.path)) or 'document'}: {e.message}"
            for e in jsonschema.Draft202012Validator(JSON_SCHEMA).iter_errors(doc)]
