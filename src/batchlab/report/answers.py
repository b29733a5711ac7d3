"""The answer first: one verdict per finding of the catalogue (docs/findings.md), computed from
the claims of a run, what would decide the findings left open, and the sources' numbers beside
ours.

The rule (also printed in the report): claims that hold by construction are checks, set aside
(unless a finding has nothing else); of the rest, a finding's verdict rests on its primary
claims, or on all of them when none is marked primary. It is not_reproduced if one of them is not
reproduced ("mixed" if another is reproduced), reproduced if every one of them is, inconclusive
if one of them is inconclusive, and untestable otherwise (a part could not be tested at this
budget, or holds by construction: never evidence). A finding no claim of this run names is
"not run".
"""

from __future__ import annotations

import csv
import io
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from batchlab.experiments import findings

NOT_RUN, MIXED = "not run", "mixed"
OUTCOMES = ("reproduced", "not_reproduced", "inconclusive", "untestable")
RULE = ("A finding's verdict rests on its primary claims (all of its claims when none is marked "
        "primary; claims that hold by construction are checks and never count): "
        "not_reproduced if one of them is not_reproduced (mixed if another is reproduced), "
        "reproduced if every one is reproduced, inconclusive if one is "
        "inconclusive, untestable otherwise; not run if no claim of this run tests it. Each "
        "claim's own verdict: untestable when its premise does not hold at this budget, it "
        "holds by construction, its interval has zero width or nothing was measured (the "
        "reason is in claims.json); else reproduced iff its whole 95% interval over independent "
        "replicates lies in the claimed region, not_reproduced iff wholly outside, else "
        "inconclusive.")


@dataclass
class FindingVerdict:
    finding: str
    verdict: str
    basis: list[dict[str, Any]] = field(default_factory=list)  # the claims it rests on
    others: int = 0  # claims naming the finding that it does not rest on

    @property
    def experiments(self) -> list[str]:
        return sorted({c.get("experiment", "") for c in self.basis} - {""})


def ids_of(claim: dict[str, Any]) -> list[str]:
    return [f.strip() for f in str(claim.get("finding", "")).split(",") if f.strip()]


def is_construction(claim: dict[str, Any]) -> bool:
    """Untestable because it holds by construction (an identity, a design constant, sampling
    theory)."""
    return (claim.get("reason") or {}).get("code") == "construction"


def combine(verdicts: list[str]) -> str:
    """The finding-level rule on the verdicts of the claims it rests on."""
    if not verdicts:
        return NOT_RUN
    kinds = set(verdicts)
    if "not_reproduced" in kinds:
        return MIXED if "reproduced" in kinds else "not_reproduced"
    if kinds == {"reproduced"}:
        return "reproduced"
    if "inconclusive" in kinds:
        return "inconclusive"
    return "untestable"


def source_counts(fvs: dict[str, FindingVerdict]) -> dict[str, dict[str, int]]:
    """Per source (S, K, C, P, G, R): how many of its findings came out each way (the four
    outcomes, mixed and not run)."""
    out: dict[str, dict[str, int]] = {}
    for fid, fv in fvs.items():
        row = out.setdefault(fid[0], dict.fromkeys((*OUTCOMES, MIXED, NOT_RUN), 0))
        row[fv.verdict] += 1
    return out


def finding_verdicts(claims: list[dict[str, Any]]) -> dict[str, FindingVerdict]:
    """Every finding id of the registry (in its order) with its verdict under the rule."""
    out: dict[str, FindingVerdict] = {}
    for fid in findings.FINDINGS:
        named = [c for c in claims if fid in ids_of(c)]
        # a claim that holds by construction is a check, never evidence: it neither decides a
        # finding nor keeps it from being decided (unless it is all the finding has)
        evidence = [c for c in named if not is_construction(c)] or named
        primary = [c for c in evidence if c.get("primary") is True]
        basis = primary or evidence
        out[fid] = FindingVerdict(fid, combine([c["verdict"] for c in basis]), basis,
                                  len(named) - len(basis))
    return out


def _num(v: Any) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "?"
    return f"{v:.3g}" if isinstance(v, (int, float)) else str(v)


def one_line(fv: FindingVerdict) -> str:
    """A one-line summary of the claims a verdict rests on (estimate, interval, region)."""
    parts = []
    for c in fv.basis[:2]:
        lo, hi = c["ci"]
        region = next(iter(c["region"].items()))
        where = (f"in [{_num(region[1][0])}, {_num(region[1][1])}]" if region[0] == "between"
                 else f"{'>=' if region[0] == 'above' else '<='} {_num(region[1])}")
        parts.append(f"{c['id']}: {_num(c['estimate'])} [{_num(lo)}, {_num(hi)}] {where} "
                     f"({c['verdict']})")
    more = len(fv.basis) - len(parts)
    if more > 0:
        parts.append(f"+{more} more")
    if fv.others:
        parts.append(f"{fv.others} secondary")
    return "; ".join(parts)


def what_decides(c: dict[str, Any]) -> str:
    """For one claim that did not decide: what would, in words, from what claims.json records
    (`to_decide` projects seeds from the measured spread; `reason` names a failed premise)."""
    reason = c.get("reason") or {}
    code = reason.get("code")
    if code == "construction":
        return "nothing: it holds by construction (" + str(reason.get("text", "")) + ")"
    if code == "regime":
        return "a budget where the premise holds (more epochs or steps): " + str(reason.get("text", ""))
    if code == "zero-width":
        return "a measurement that varies across seeds (all replicates gave one value)"
    if code == "unmeasured":
        return "a run that measures it: " + str(reason.get("text", ""))
    td = c.get("to_decide") or {}
    if td.get("replicates"):
        return f"about {td['replicates']} seeds at the measured spread (now {c.get('n')})"
    if td.get("limited_by") == "test set":
        k = td.get("test_set_factor")
        return ("a larger test set" + (f" (about {k}x)" if k else "")
                + ": the test set's sampling error alone is wider than the margin")
    if td.get("limited_by"):
        return str(td["limited_by"])
    return "more seeds" if c.get("verdict") == "inconclusive" else ""


def open_findings(fvs: dict[str, FindingVerdict]) -> list[tuple[str, str, list[tuple[str, str]]]]:
    """(finding, verdict, [(claim id, what would decide it)]) for every finding run but not
    decided (inconclusive, untestable or mixed)."""
    out = []
    for fid, fv in fvs.items():
        if fv.verdict in ("reproduced", "not_reproduced", NOT_RUN):
            continue
        rows = [(c["id"], what_decides(c)) for c in fv.basis
                if c["verdict"] in ("inconclusive", "untestable")]
        if not rows and fv.verdict == MIXED:  # every part decided, and they disagree
            rows = [("", "nothing more: its parts are decided and disagree ("
                     + ", ".join(f"{c['id']} {c['verdict']}" for c in fv.basis) + ")")]
        out.append((fid, fv.verdict, rows))
    return out


def verdicts_markdown(claims: list[dict[str, Any]]) -> str:
    """The verdict table as Markdown (written beside the report as verdicts.md): outcomes per
    source, every finding's verdict, and what would decide the ones left open."""
    fvs = finding_verdicts(claims)
    cols = (*OUTCOMES, MIXED, NOT_RUN)
    counts = source_counts(fvs)
    lines = ["# Verdicts", "", RULE, "", "| source | " + " | ".join(cols) + " |",
             "|---|" + "---|" * len(cols)]
    for src, title in findings.SOURCES.items():
        row = counts.get(src, dict.fromkeys(cols, 0))
        lines.append(f"| {src} ({title}) | " + " | ".join(str(row[c]) for c in cols) + " |")
    lines += ["", "| finding | verdict | evidence |", "|---|---|---|"]
    lines += [f"| {fid} | {fv.verdict} | {one_line(fv)} |" for fid, fv in fvs.items()]
    todo = open_findings(fvs)
    if todo:
        lines += ["", "## What would decide the findings left open", "",
                  "| finding | verdict | claim | what would decide it |", "|---|---|---|---|"]
        for fid, v, rows in todo:
            for cid, how in rows or [("", "")]:
                lines.append(f"| {fid} | {v} | {cid} | {how.replace('|', '/')} |")
    return "\n".join(lines) + "\n"


def read_numbers(out: Path, names: list[str]) -> list[dict[str, str]]:
    """The study-numbers rows: OUT/study_numbers.csv (written by `reproduce`), else the union of
    the experiments' own files (a measured row wins over an unmeasured one)."""
    files = [out / "study_numbers.csv"] if (out / "study_numbers.csv").exists() else \
        [out / n / "study_numbers.csv" for n in names if (out / n / "study_numbers.csv").exists()]
    rows: dict[tuple[str, str, str], dict[str, str]] = {}
    for f in files:
        for r in csv.DictReader(io.StringIO(f.read_text())):
            k = (r["finding"], r["quantity"], r["setting"])
            if k not in rows or (not rows[k].get("measured") and r.get("measured")):
                rows[k] = r
    return list(rows.values())
