"""How close `reproduce --plan` comes to the real run, per experiment.

Reads the JSON of a real run (`batchlab reproduce --json ...`: each experiment's wall seconds
and the process's CPU seconds) and one or more plans (`batchlab reproduce --plan --json` on a
fresh store) and prints a Markdown table: real CPU and wall seconds, each plan's projection
and projection / real CPU seconds.

Why CPU seconds: on a shared machine the wall time of the real run grows with the other jobs
(3-4x at a load of 12 on two cores), while the plan's probe estimates an idle machine. With
one intra-op thread (`OMP_NUM_THREADS=1`, so one trial and curvature worker too) the process's
CPU time is the time the same work takes alone on one core, which is what the plan projects
for that setting.

    OMP_NUM_THREADS=1 batchlab reproduce --preset quick --out OUT --store S.db --json > real.json
    OMP_NUM_THREADS=1 batchlab reproduce --preset quick --plan --json --store FRESH.db \\
        --out PO > plan.json
    python benchmarks/plan_accuracy.py real.json plan.json [older_plan.json ...]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def table(real: dict, plans: list[dict]) -> list[str]:
    cpu, wall = real["cpu_seconds"], real["seconds"]
    head = "| experiment | real CPU s | real wall s |" + "".join(
        f" projected s ({i + 1}) | ratio ({i + 1}) |" for i in range(len(plans)))
    out = [head, "|" + "---|" * (3 + 2 * len(plans))]
    totals = [0.0] * len(plans)
    counted = [n for n in cpu if not _measures_itself(n, plans)]
    for name in cpu:
        row = f"| {name} | {cpu[name]:.0f} | {wall[name]:.0f} |"
        for i, plan in enumerate(plans):
            exp = next((e for e in plan["experiments"] if e["name"] == name), None)
            if exp is None or name not in counted:
                row += " - | - |"
                continue
            totals[i] += exp["seconds"]
            row += f" {exp['seconds']:.0f} | {exp['seconds'] / cpu[name]:.2f} |"
        out.append(row)
    c = sum(cpu[n] for n in counted)
    w = sum(wall[n] for n in counted)
    out.append(f"| total (projected experiments) | {c:.0f} | {w:.0f} |"
               + "".join(f" {t:.0f} | {t / c:.2f} |" for t in totals))
    return out


def _measures_itself(name: str, plans: list[dict]) -> bool:
    """An experiment the plan does not project (it times things itself: throughput)."""
    return any(any(e["name"] == name and "not projected" in " ".join(e.get("notes", []))
                   for e in p["experiments"]) for p in plans)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("real", type=Path, help="JSON of `reproduce --json`")
    ap.add_argument("plans", type=Path, nargs="+", help="JSON of `reproduce --plan --json`")
    a = ap.parse_args()
    real = json.loads(a.real.read_text())
    if "cpu_seconds" not in real:
        raise SystemExit(f"{a.real} has no cpu_seconds: made by a batchlab before they were "
                         "reported")
    plans = [json.loads(p.read_text()) for p in a.plans]
    print("\n".join(table(real, plans)))


if __name__ == "__main__":
    main()
