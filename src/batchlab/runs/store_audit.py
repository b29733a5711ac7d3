"""Reading a whole store back: the audit behind `batchlab runs check` (rows, checkpoints,
measurement rows and files) and the flat export behind `batchlab runs export`.

Functions of an open `Store`, kept apart from it because they walk every row and every file:
the class stays the per-run operations a sweep needs.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

from batchlab.atomic import atomic_path, check_writable
from batchlab.errors import BatchlabError
from batchlab.runs.store_schema import DamagedRow, scalar


def check_runs(store: Any) -> list[tuple[str | None, str]]:
    """`check`'s problems as (run_id or None, problem): the run ids are what
    `batchlab runs delete --damaged` deletes."""
    from batchlab.runs.upkeep import check_artifacts

    with store._guard():
        problems: list[tuple[str | None, str]] = [
            (None, r) for (r,) in store.conn.execute("PRAGMA integrity_check") if r != "ok"]
        rows = store.conn.execute(f"{store._select()} ORDER BY created_at").fetchall()
    for r in rows:
        try:
            rec = store._record(r, with_epochs=True)
        except DamagedRow as e:
            problems.append((str(r[0]), f"damaged row: {e}"))
            continue
        arts = [(rec.run_id, n, p, sh) for n, (p, sh) in rec.artifacts.items()]
        found = check_artifacts(arts, weights=rec.status == "completed")
        problems += [(rec.run_id, p) for p in found]
    return problems + [(None, p) for p in check_measurements(store)]


def check_measurements(store: Any) -> list[str]:
    if store.conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND "
                         "name = 'measurements'").fetchone() is None:
        return []
    from batchlab.runs.measurement_files import verify_row

    with store._guard():
        rows = store.conn.execute("SELECT key, kind, payload_json, checksum, files_json "
                                 "FROM measurements ORDER BY created_at").fetchall()
    out = []
    for key, kind, text, checksum, files in rows:
        problem = verify_row(store, text, checksum, files)
        if problem is not None:
            out.append(f"measurement {kind} {str(key)[:12]}: {problem} (recomputed when "
                       f"the experiment runs again)")
    return out


def export_rows(store: Any) -> list[dict[str, Any]]:
    """One flat row per (run, epoch): config fields prefixed `cfg_`, then the metrics."""
    rows = []
    for rec in store.runs(with_epochs=True):
        base = {"run_id": rec.run_id, "status": rec.status, "label": rec.label,
                "seed": rec.seed}
        base.update({f"cfg_{k}": scalar(v) for k, v in rec.config.items()})
        for ep in rec.epochs or [{}]:
            rows.append({**base, **{k: scalar(v) for k, v in ep.items()}})
    return rows


def export(store: Any, path: Path, fmt: str = "csv") -> int:
    """Write every (run, epoch) row to `path` atomically (never a half file)."""
    if fmt not in ("csv", "parquet"):
        raise BatchlabError(f"unknown export format {fmt!r}; use csv or parquet")
    if fmt == "parquet":
        try:
            import pyarrow as pa
            import pyarrow.parquet as pq
        except ImportError:
            raise BatchlabError("parquet export needs pyarrow: pip install 'batchlab[parquet]'") from None
    check_writable(path, "--output")
    rows = export_rows(store)
    cols: list[str] = []
    for r in rows:
        cols.extend(k for k in r if k not in cols)
    with atomic_path(path) as tmp:
        if fmt == "csv":
            with open(tmp, "w", newline="") as f:
                w = csv.DictWriter(f, fieldnames=cols)
                w.writeheader()
                w.writerows(rows)
        else:
            table = pa.Table.from_pylist([{c: r.get(c) for c in cols} for r in rows])
            pq.write_table(table, str(tmp))
    return len(rows)
