"""Writing an experiment's outputs: results.csv, summary.md (with the verdict rules),
claims.json and PNG figures. Files are written to a temp name and renamed, so an interrupted
experiment never leaves a half-written file behind."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from batchlab.atomic import atomic_write, to_json  # noqa: E402
from batchlab.experiments import findings  # noqa: E402
from batchlab.experiments.base import Experiment, Output  # noqa: E402
from batchlab.experiments.claims import dumps  # noqa: E402


def rows_to_csv(rows: list[dict[str, Any]]) -> str:
    cols: list[str] = []
    for r in rows:
        cols.extend(k for k in r if k not in cols)
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=cols)
    w.writeheader()
    for r in rows:
        w.writerow({k: (to_json(v) if isinstance(v, (list, dict)) else v) for k, v in r.items()})
    return buf.getvalue()


def md_table(rows: list[dict[str, Any]], cols: list[str] | None = None, fmt: str = "{:.4g}") -> str:
    """A markdown table (floats formatted with `fmt`)."""
    if not rows:
        return "_no rows_\n"
    cols = cols or list(rows[0])
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        cells = []
        for c in cols:
            v = r.get(c, "")
            cells.append(fmt.format(v) if isinstance(v, float) else str(v))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def claims_md(claims: list) -> str:
    lines = ["## Claims and verdicts", ""]
    for c in claims:
        tag = f" [{c.finding}]" if getattr(c, "finding", None) else ""
        role = "" if getattr(c, "primary", None) is None else (" (primary)" if c.primary else " (secondary)")
        lines.append(f"- **{c.id}**{tag}{role} — {c.claim}: **{c.verdict}**")
        iv = getattr(c, "interval", None)
        if iv is not None:
            lines.append(f"  - {c.quantity}: {_fmt(iv.estimate)}, 95% interval "
                         f"[{_fmt(iv.lo)}, {_fmt(iv.hi)}] ({iv.method}, n = {iv.n}); "
                         f"claimed region {c.region.describe()}")
        if getattr(c, "reading", None):
            lines.append(f"  - reading: {c.reading}")
        if c.rule:
            lines.append(f"  - rule: {c.rule}")
        ev = ", ".join(f"{k}={_fmt(v)}" for k, v in c.evidence.items() if not isinstance(v, (list, dict)))
        if ev:
            lines.append(f"  - evidence: {ev}")
    return "\n".join(lines) + "\n"


def claims_json(claims: list[dict[str, Any]]) -> str:
    """The versioned claims document as strict JSON (non-finite numbers become null)."""
    return dumps(claims)


def load_claims(path: Path) -> list[dict[str, Any]]:
    """The claim objects of a claims.json file (version 2 document)."""
    doc = json.loads(Path(path).read_text())
    return doc["claims"] if isinstance(doc, dict) else doc


def _fmt(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def write_outputs(exp: Experiment, output: Output, out_dir: Path) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write(out_dir / "results.csv", rows_to_csv(output.rows))
    summary = f"# {exp.title}\n\n{output.summary.strip()}\n\n{claims_md(output.claims)}"
    atomic_write(out_dir / "summary.md", summary)
    atomic_write(out_dir / "claims.json", claims_json([c.to_json() for c in output.claims]))
    if output.study_numbers:
        atomic_write(out_dir / "study_numbers.csv", findings.to_csv(findings.merge(output.study_numbers)))
    for name, fig in output.figures.items():
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
        plt.close(fig)
        atomic_write(out_dir / name, buf.getvalue())
    for name, text in output.extra_files.items():
        atomic_write(out_dir / name, text)
    return out_dir
