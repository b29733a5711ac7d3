"""The results store: one SQLite file (WAL mode, so `runs list` can read while a sweep writes).

Tables: `runs` (config JSON, config hash = primary identity, seed, status, timings,
environment, final metrics), `epochs` (per-epoch metrics as JSON), `artifacts` (files with their
sha256). A finished run is written in ONE transaction, so a SIGKILL at any moment leaves either
the whole run or nothing: re-running a sweep recomputes only what is missing, duplicates
nothing, and never sees a half row. Other modules add their own tables with `ensure_schema`.
"""

from __future__ import annotations

import csv
import json
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from batchlab.errors import BatchlabError

DEFAULT_STORE = "batchlab.db"
FINISHED = ("completed", "diverged")

SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    run_id TEXT PRIMARY KEY,
    config_hash TEXT NOT NULL UNIQUE,
    config_json TEXT NOT NULL,
    seed INTEGER NOT NULL,
    status TEXT NOT NULL CHECK (status IN ('completed', 'diverged', 'failed')),
    error TEXT,
    label TEXT,
    created_at REAL NOT NULL,
    wall_seconds REAL,
    env_json TEXT,
    final_json TEXT
);
CREATE TABLE IF NOT EXISTS epochs (
    run_id TEXT NOT NULL REFERENCES runs(run_id) ON DELETE CASCADE,
    epoch INTEGER NOT NULL,
    metrics_json TEXT NOT NULL,
    PRIMARY KEY (run_id, epoch)
);
CREATE TABLE IF NOT EXISTS artifacts (
    run_id TEXT NOT NULL REFERENCES runs(run_id) ON DELETE CASCADE,
    name TEXT NOT NULL,
    path TEXT NOT NULL,
    sha256 TEXT NOT NULL,
    PRIMARY KEY (run_id, name)
);
CREATE INDEX IF NOT EXISTS runs_label ON runs(label);
"""


@dataclass
class RunRecord:
    run_id: str
    config_hash: str
    config: dict[str, Any]
    seed: int
    status: str
    epochs: list[dict[str, Any]] = field(default_factory=list)
    final: dict[str, Any] = field(default_factory=dict)
    error: str | None = None
    label: str | None = None
    created_at: float = field(default_factory=time.time)
    wall_seconds: float | None = None
    env: dict[str, Any] = field(default_factory=dict)
    artifacts: dict[str, tuple[str, str]] = field(default_factory=dict)  # name -> (path, sha)


class Store:
    """A handle on one store file. Cheap to open; safe to open from several processes."""

    def __init__(self, path: str | Path = DEFAULT_STORE) -> None:
        self.path = Path(path)
        if self.path.exists() and self.path.is_dir():
            raise BatchlabError(f"--store {self.path} is a directory, not a database file")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.conn = sqlite3.connect(str(self.path), timeout=60.0, isolation_level=None)
            self.conn.execute("PRAGMA journal_mode=WAL")
            self.conn.execute("PRAGMA synchronous=NORMAL")
            self.conn.execute("PRAGMA foreign_keys=ON")
            self.conn.executescript(SCHEMA)
        except sqlite3.DatabaseError as e:
            raise BatchlabError(f"cannot open results store {self.path}: {e}") from None

    @property
    def artifacts_dir(self) -> Path:
        return self.path.with_name(self.path.name + ".artifacts")

    def close(self) -> None:
        self.conn.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        self.conn.execute("BEGIN IMMEDIATE")
        try:
            yield self.conn
        except BaseException:
            self.conn.execute("ROLLBACK")
            raise
        self.conn.execute("COMMIT")

    def ensure_schema(self, sql: str) -> None:
        """Let another module add its tables (idempotent `CREATE ... IF NOT EXISTS`)."""
        self.conn.executescript(sql)

    # -- writing ------------------------------------------------------------------------------
    def save_run(self, rec: RunRecord) -> None:
        """Insert or replace a run with all its epochs and artifacts, atomically."""
        with self.transaction() as c:
            c.execute("DELETE FROM runs WHERE config_hash = ? OR run_id = ?",
                      (rec.config_hash, rec.run_id))
            c.execute(
                "INSERT INTO runs VALUES (?,?,?,?,?,?,?,?,?,?,?)",
                (
                    rec.run_id, rec.config_hash, json.dumps(rec.config, sort_keys=True),
                    rec.seed, rec.status, rec.error, rec.label, rec.created_at,
                    rec.wall_seconds, json.dumps(rec.env), json.dumps(rec.final),
                ),
            )
            c.executemany(
                "INSERT INTO epochs VALUES (?,?,?)",
                [(rec.run_id, int(e["epoch"]), json.dumps(e)) for e in rec.epochs],
            )
            c.executemany(
                "INSERT INTO artifacts VALUES (?,?,?,?)",
                [(rec.run_id, n, p, s) for n, (p, s) in rec.artifacts.items()],
            )

    # -- reading ------------------------------------------------------------------------------
    def _record(self, row: sqlite3.Row | tuple, with_epochs: bool = True) -> RunRecord:
        (run_id, chash, cfg, seed, status, error, label, created, wall, env, final) = row
        rec = RunRecord(
            run_id=run_id, config_hash=chash, config=json.loads(cfg), seed=seed, status=status,
            error=error, label=label, created_at=created, wall_seconds=wall,
            env=json.loads(env or "{}"), final=json.loads(final or "{}"),
        )
        if with_epochs:
            rec.epochs = self.epochs(run_id)
            rec.artifacts = {
                n: (p, s)
                for n, p, s in self.conn.execute(
                    "SELECT name, path, sha256 FROM artifacts WHERE run_id = ?", (run_id,)
                )
            }
        return rec

    def get(self, key_or_id: str, with_epochs: bool = True) -> RunRecord | None:
        """A run by config hash, run id, or a unique prefix of either."""
        row = self.conn.execute(
            "SELECT * FROM runs WHERE config_hash = ? OR run_id = ?", (key_or_id, key_or_id)
        ).fetchone()
        if row is None and len(key_or_id) >= 4:
            rows = self.conn.execute(
                "SELECT * FROM runs WHERE run_id LIKE ? OR config_hash LIKE ?",
                (key_or_id + "%", key_or_id + "%"),
            ).fetchall()
            row = rows[0] if len(rows) == 1 else None
        return self._record(row, with_epochs) if row else None

    def finished(self, config_hash: str) -> RunRecord | None:
        """The stored run for this hash if it completed or diverged (both are final results)."""
        rec = self.get(config_hash)
        return rec if rec is not None and rec.status in FINISHED else None

    def epochs(self, run_id: str) -> list[dict[str, Any]]:
        return [
            json.loads(m)
            for (m,) in self.conn.execute(
                "SELECT metrics_json FROM epochs WHERE run_id = ? ORDER BY epoch", (run_id,)
            )
        ]

    def runs(self, label: str | None = None, status: str | None = None,
             with_epochs: bool = False) -> list[RunRecord]:
        sql, args = "SELECT * FROM runs WHERE 1=1", []
        if label is not None:
            sql += " AND label = ?"
            args.append(label)
        if status is not None:
            sql += " AND status = ?"
            args.append(status)
        sql += " ORDER BY created_at"
        return [self._record(r, with_epochs) for r in self.conn.execute(sql, args).fetchall()]

    def count(self) -> int:
        return self.conn.execute("SELECT COUNT(*) FROM runs").fetchone()[0]

    # -- export ---------------------------------------------------------------------------------
    def export_rows(self) -> list[dict[str, Any]]:
        """One flat row per (run, epoch): config fields prefixed `cfg_`, then the metrics."""
        rows = []
        for rec in self.runs(with_epochs=True):
            base = {"run_id": rec.run_id, "status": rec.status, "label": rec.label,
                    "seed": rec.seed}
            base.update({f"cfg_{k}": _scalar(v) for k, v in rec.config.items()})
            for ep in rec.epochs or [{}]:
                rows.append({**base, **{k: _scalar(v) for k, v in ep.items()}})
        return rows

    def export(self, path: Path, fmt: str = "csv") -> int:
        rows = self.export_rows()
        cols: list[str] = []
        for r in rows:
            cols.extend(k for k in r if k not in cols)
        path = Path(path)
        if fmt == "csv":
            with open(path, "w", newline="") as f:
                w = csv.DictWriter(f, fieldnames=cols)
                w.writeheader()
                w.writerows(rows)
        elif fmt == "parquet":
            try:
                import pyarrow as pa
                import pyarrow.parquet as pq
            except ImportError:
                raise BatchlabError("parquet export needs pyarrow: pip install 'batchlab[parquet]'") from None
            table = pa.Table.from_pylist([{c: r.get(c) for c in cols} for r in rows])
            pq.write_table(table, path)
        else:
            raise BatchlabError(f"unknown export format {fmt!r}; use csv or parquet")
        return len(rows)


def _scalar(v: Any) -> Any:
    return json.dumps(v) if isinstance(v, (list, dict, tuple)) else v
