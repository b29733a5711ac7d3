"""The verdict engine's measured error rates and power (issue: verdicts a statistician signs).

For every interval method and claim kind (`batchlab.experiments.calibration.KINDS`) and
n = 1, 2, 3, 5 independent replicates, draws synthetic experiments with a known truth - the
effect exactly on the region's boundary, the centre of an equivalence region, real effects 1, 2
and 4 replicate standard deviations inside - and counts how often each verdict comes out.
At the boundary every "reproduced" is wrong; the engine promises at most 2.5% (within
Monte-Carlo error). Prints a markdown table; `--out DIR` also writes calibration.csv,
calibration.md and power.png there.

    python benchmarks/verdict_calibration.py                  # 4,000 draws per cell
    python benchmarks/verdict_calibration.py --draws 1000 --jobs 2
"""

from __future__ import annotations

import argparse
import csv
import math
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from batchlab.experiments import calibration as C

NS = (1, 2, 3, 5)


def _cell(args: tuple[int, int, str, float, int, int]) -> dict:
    ki, n, truth_name, truth, draws, seed = args
    kind = C.KINDS[ki]
    rates = C.run_cell(kind, n, truth, draws, seed)
    return {"kind": kind.name, "region": kind.region.describe(), "n": n, "truth": truth_name,
            "value": truth, "draws": draws, **rates}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--draws", type=int, default=4000, help="draws per cell (default 4000)")
    ap.add_argument("--jobs", type=int, default=1, help="worker processes")
    ap.add_argument("--out", type=Path, default=None, help="write csv, md and png here")
    a = ap.parse_args()
    if a.draws < 1 or a.jobs < 1:
        print("error: --draws and --jobs must be positive", file=sys.stderr)
        return 2
    jobs = [(ki, n, tn, tv, a.draws, 1000 * ki + 10 * n + j)
            for ki, k in enumerate(C.KINDS) for n in NS
            for j, (tn, tv) in enumerate(C.truths(k).items())]
    t0 = time.perf_counter()
    if a.jobs > 1:
        with ProcessPoolExecutor(a.jobs) as ex:
            rows = list(ex.map(_cell, jobs))
    else:
        rows = [_cell(j) for j in jobs]
    secs = time.perf_counter() - t0
    bad = [r for r in rows if r["truth"] == "boundary" and "rejected" not in r["kind"]
           and r["reproduced"] > 0.025 + 2 * C.mc_error(0.025, r["draws"])]
    table = markdown(rows)
    print(table)
    print(f"\n{len(rows)} cells x {a.draws} draws in {secs:.0f} s. Boundary cells over 2.5% "
          f"(+2 Monte-Carlo SE) among the engine's methods: {len(bad)}"
          + "".join(f"\n  {r['kind']} n={r['n']}: {r['reproduced']:.2%}" for r in bad))
    if a.out:
        a.out.mkdir(parents=True, exist_ok=True)
        with (a.out / "calibration.csv").open("w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
        (a.out / "calibration.md").write_text(table + "\n")
        power_figure(rows).savefig(a.out / "power.png", dpi=110)
    return 1 if bad else 0


def markdown(rows: list[dict]) -> str:
    """One line per (kind, truth): the rate of the outcome that matters at each n - wrong
    'reproduced' at the boundary, 'reproduced' (power) elsewhere - with 'not reproduced' in
    brackets where it is not zero."""
    lines = ["| claim kind | region | truth | " + " | ".join(f"n = {n}" for n in NS) + " |",
             "|---|---|---|" + "---|" * len(NS)]
    keys = []
    for r in rows:
        k = (r["kind"], r["truth"])
        if k not in keys:
            keys.append(k)
    for kind, truth in keys:
        cells = {r["n"]: r for r in rows if r["kind"] == kind and r["truth"] == truth}
        region = next(iter(cells.values()))["region"]
        what = "wrong reproduced" if truth == "boundary" else "reproduced"
        vals = []
        for n in NS:
            r = cells[n]
            v = f"{r['reproduced']:.1%}"
            if r["not_reproduced"] > 0 and truth != "boundary":
                v += f" (NR {r['not_reproduced']:.1%})"
            vals.append(v)
        lines.append(f"| {kind} | {region} | {truth} ({what}) | " + " | ".join(vals) + " |")
    return "\n".join(lines)


def power_figure(rows: list[dict]):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kinds = [k.name for k in C.KINDS if "rejected" not in k.name]
    fig, axes = plt.subplots(2, math.ceil(len(kinds) / 2), figsize=(3.2 * math.ceil(len(kinds) / 2), 6),
                             squeeze=False)
    for ax, kind in zip(axes.flat, kinds):
        sel = [r for r in rows if r["kind"] == kind]
        truths = list(dict.fromkeys(r["truth"] for r in sel))
        for n in NS:
            ax.plot(range(len(truths)), [next(r["reproduced"] for r in sel if r["n"] == n and
                                              r["truth"] == t) for t in truths], "o-", label=f"n={n}")
        ax.axhline(0.025, color="k", ls=":", lw=1)
        ax.set_xticks(range(len(truths)), truths, rotation=30, fontsize=7)
        ax.set_title(kind, fontsize=8)
        ax.set_ylim(-0.02, 1.02)
    for ax in list(axes.flat)[len(kinds):]:
        ax.axis("off")
    axes.flat[0].set_ylabel("P(reproduced)")
    axes.flat[0].legend(fontsize=7)
    fig.suptitle("Verdict engine: P(reproduced) at the boundary (must be <= 2.5%) and power")
    fig.tight_layout()
    return fig


if __name__ == "__main__":
    sys.exit(main())
