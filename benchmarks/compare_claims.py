"""Compare two `reproduce` output folders claim by claim: the check behind "the same answers"
when a change is meant to alter how work is done, not what it finds (a design that trains
less, a refactor, a continued run instead of a retrained one).

    python benchmarks/compare_claims.py OUT_BEFORE OUT_AFTER [--markdown]

Per experiment found in both: every claim's verdict before and after, and whether the whole
claim (estimate, interval, replicates, evidence) is identical; then whether `results.csv` is
identical once measured times are left out (columns naming seconds: wall-clock timings differ
between any two runs). Exit code 0 when every claim and every table is identical, 1 otherwise
(a claim built on measured time, such as steps-to-target's P3, differs by nature: read it).
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path
from typing import Any

TIMING = ("second", "sps")


def claims(folder: Path) -> list[dict[str, Any]]:
    path = folder / "claims.json"
    return json.loads(path.read_text())["claims"] if path.is_file() else []


def table(folder: Path) -> list[dict[str, str]] | None:
    path = folder / "results.csv"
    if not path.is_file():
        return None
    with path.open() as f:
        return [{k: v for k, v in row.items() if not any(t in k for t in TIMING)}
                for row in csv.DictReader(f)]


def compare(before: Path, after: Path) -> tuple[list[dict[str, Any]], bool]:
    rows, same_all = [], True
    names = sorted(p.name for p in before.iterdir()
                   if p.is_dir() and (after / p.name / "claims.json").is_file())
    for name in names:
        a, b = claims(before / name), claims(after / name)
        by_id = {c["id"]: c for c in b}
        for c in a:
            d = by_id.get(c["id"])
            same = d == c
            same_all &= same
            rows.append({"experiment": name, "claim": c["id"], "finding": c["finding"],
                         "before": c["verdict"], "after": d["verdict"] if d else "(missing)",
                         "identical": "yes" if same else "no"})
        for cid in sorted(set(by_id) - {c["id"] for c in a}):
            same_all = False
            rows.append({"experiment": name, "claim": cid, "finding": by_id[cid]["finding"],
                         "before": "(missing)", "after": by_id[cid]["verdict"], "identical": "no"})
        ta, tb = table(before / name), table(after / name)
        same_table = ta == tb
        same_all &= same_table
        rows.append({"experiment": name, "claim": "results.csv (times aside)", "finding": "",
                     "before": "", "after": "", "identical": "yes" if same_table else "no"})
    return rows, same_all


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("before", type=Path)
    ap.add_argument("after", type=Path)
    ap.add_argument("--markdown", action="store_true", help="a Markdown table")
    args = ap.parse_args()
    for p in (args.before, args.after):
        if not p.is_dir():
            print(f"error: {p} is not a reproduce output folder", file=sys.stderr)
            return 2
    rows, same = compare(args.before, args.after)
    cols = ["experiment", "claim", "finding", "before", "after", "identical"]
    if args.markdown:
        print("| " + " | ".join(cols) + " |\n|" + "---|" * len(cols))
        for r in rows:
            print("| " + " | ".join(str(r[c]) for c in cols) + " |")
    else:
        for r in rows:
            print("  ".join(f"{r[c]!s:<{w}}" for c, w in zip(cols, (22, 44, 7, 15, 15, 3))))
    print(f"{'every claim and table identical' if same else 'differences above'}",
          file=sys.stderr)
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
