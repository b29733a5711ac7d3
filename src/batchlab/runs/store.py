"""The results store: one SQLite file (WAL mode, so `runs list` can read while a sweep writes).

Tables: `runs` (config JSON, config hash = primary identity, seed, status, timings,
environment, final metrics), `epochs` (per-epoch metrics as JSON), `artifacts` (files with their
sha256). A finished run is written in ONE transaction, so a SIGKILL at any moment leaves either
the whole run or nothing: re-running a sweep recomputes only what is missing, duplicates
nothing, and never sees a half row. Other modules add their own tables with `ensure_schema`.

A store is marked (SQLite `application_id` and `user_version`), so batchlab never writes into
another program's database: a non-empty file that is not a store is refused before anything is
written. Stores of earlier versions (no marks, batchlab's exact tables) are adopted. A damaged
file is one error naming it; a damaged row is skipped with a warning (`Store.skipped`) and
reported by `batchlab runs check`.
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
from urllib.parse import quote

from batchlab.atomic import atomic_path, check_writable
from batchlab.errors import BatchlabError

DEFAULT_STORE = "batchlab.db"
FINISHED = ("completed", "diverged")
APPLICATION_ID = 0x42544C42  # "BTLB": marks the file as a batchlab store
SCHEMA_VERSION = 1
SQLITE_MAGIC = b"SQLite format 3\x00"

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


COLUMNS = {  # batchlab's own tables, exactly: an unmarked file with these is an older store
    "runs": ["run_id", "config_hash", "config_json", "seed", "status", "error", "label",
             "created_at", "wall_seconds", "env_json", "final_json"],
    "epochs": ["run_id", "epoch", "metrics_json"],
    "artifacts": ["run_id", "name", "path", "sha256"],
}


class DamagedRow(BatchlabError):
    """A stored row whose JSON cannot be read (hand-edited or corrupted)."""

def _json_dict(text: Any, what: str, run_id: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except (TypeError, ValueError):
        value = None
    if not isinstance(value, dict):
        raise DamagedRow(f"run {run_id}: {what} is not a JSON object")
    return value


class Store:
    """A handle on one store file. Cheap to open; safe to open from several processes.

    `readonly=True` never writes (for list/show/export/check on a file that may be read-only);
    a writable open also removes leftovers of killed writers in the artifacts folder."""

    def __init__(self, path: str | Path = DEFAULT_STORE, readonly: bool = False) -> None:
        self.path = Path(path)
        self.readonly = readonly
        self.skipped: list[tuple[str, str]] = []  # (run_id, why) of damaged rows passed over
        self.removed: list[Path] = []  # leftovers cleaned when opening
        if self.path.is_dir():
            raise BatchlabError(f"--store {self.path} is a directory, not a database file")
        if not readonly:
            check_writable(self.path, "--store")
        self._refuse_non_sqlite()
        try:
            if readonly:
                uri = f"file:{quote(str(self.path.absolute()))}?mode=ro"
                self.conn = sqlite3.connect(uri, uri=True, timeout=60.0, isolation_level=None)
            else:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                self.conn = sqlite3.connect(str(self.path), timeout=60.0, isolation_level=None)
        except (sqlite3.Error, OSError) as e:
            raise BatchlabError(f"cannot open results store {self.path}: {e}") from None
        with self._guard():
            fresh = self._identify()
            if not readonly:
                self.conn.execute("PRAGMA journal_mode=WAL")
                self.conn.execute("PRAGMA synchronous=NORMAL")
                self.conn.execute("PRAGMA foreign_keys=ON")
                if fresh:
                    self.conn.execute(f"PRAGMA application_id={APPLICATION_ID}")
                    self.conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
                self.conn.executescript(SCHEMA)
        if not readonly:
            self.removed = self.clean_leftovers()

    # -- identity -----------------------------------------------------------------------------
    def _refuse_non_sqlite(self) -> None:
        try:
            with open(self.path, "rb") as f:
                head = f.read(len(SQLITE_MAGIC))
        except FileNotFoundError:
            return
        except OSError as e:
            raise BatchlabError(f"cannot read results store {self.path}: {e.strerror}") from None
        if head and head != SQLITE_MAGIC:
            raise BatchlabError(
                f"{self.path} is not a results store (not an SQLite file: damaged, or another "
                f"kind of file); restore it from a backup or move it away, or pass another --store")

    def _identify(self) -> bool:
        """Check the file is a batchlab store before anything is written; True for a new one
        (or an older store being adopted) that needs its marks set."""
        app_id = self.conn.execute("PRAGMA application_id").fetchone()[0]
        version = self.conn.execute("PRAGMA user_version").fetchone()[0]
        tables = {n for (n,) in self.conn.execute(
            "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%'")}
        if app_id == APPLICATION_ID:
            if version > SCHEMA_VERSION:
                raise BatchlabError(f"results store {self.path} was written by a newer batchlab "
                                    f"(schema {version}); upgrade batchlab to read it")
            return False
        if app_id != 0:
            raise BatchlabError(f"{self.path} is another program's SQLite database "
                                f"(application_id {app_id}), not a results store; pass another --store")
        if not tables:
            if self.readonly:
                raise BatchlabError(f"{self.path} is an empty file, not a results store")
            return True
        own = {t: [r[1] for r in self.conn.execute(f"PRAGMA table_info({t})")] for t in COLUMNS}
        if own == COLUMNS:
            return True  # an older store of batchlab (before the marks): adopt it
        what = ("its `runs` table is not batchlab's" if "runs" in tables
                else f"it holds tables {', '.join(sorted(tables)[:5])}")
        raise BatchlabError(f"{self.path} is another program's SQLite database ({what}), "
                            f"not a results store; pass another --store")

    @contextmanager
    def _guard(self) -> Iterator[None]:
        """SQLite failures as one-line errors that name the file and what to do."""
        try:
            yield
        except sqlite3.IntegrityError:
            raise
        except sqlite3.DatabaseError as e:
            msg = str(e)
            if "locked" in msg or "busy" in msg:
                raise BatchlabError(f"results store {self.path} stayed locked by another process "
                                    f"for 60 s; try again when it has finished") from None
            if "readonly" in msg or "read-only" in msg:
                raise BatchlabError(f"results store {self.path} is read-only") from None
            raise BatchlabError(
                f"results store {self.path} is damaged ({msg}); `batchlab runs check --store "
                f"{self.path}` shows what is readable; restore a backup or move it away") from None

    @property
    def artifacts_dir(self) -> Path:
        return self.path.with_name(self.path.name + ".artifacts")

    def clean_leftovers(self) -> list[Path]:
        """Remove what killed writers left in the artifacts folder (see `upkeep.leftovers`)."""
        from batchlab.runs.upkeep import clean_artifacts

        with self._guard():
            known = {r for (r,) in self.conn.execute("SELECT run_id FROM runs")}
        return clean_artifacts(self.artifacts_dir, known)

    def close(self) -> None:
        self.conn.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        with self._guard():
            self.conn.execute("BEGIN IMMEDIATE")
            try:
                yield self.conn
            except BaseException:
                self.conn.execute("ROLLBACK")
                raise
            self.conn.execute("COMMIT")

    def ensure_schema(self, sql: str) -> None:
        """Let another module add its tables (idempotent `CREATE ... IF NOT EXISTS`)."""
        with self._guard():
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
        """A row as a RunRecord; `DamagedRow` if any of its JSON cannot be read."""
        (run_id, chash, cfg, seed, status, error, label, created, wall, env, final) = row
        rec = RunRecord(
            run_id=run_id, config_hash=chash, config=_json_dict(cfg, "config_json", run_id),
            seed=seed, status=status, error=error, label=label, created_at=created,
            wall_seconds=wall, env=_json_dict(env or "{}", "env_json", run_id),
            final=_json_dict(final or "{}", "final_json", run_id),
        )
        if with_epochs:
            rec.epochs = self.epochs(run_id)
            with self._guard():
                rec.artifacts = {
                    n: (p, s)
                    for n, p, s in self.conn.execute(
                        "SELECT name, path, sha256 FROM artifacts WHERE run_id = ?", (run_id,))
                }
        return rec

    def get(self, key_or_id: str, with_epochs: bool = True) -> RunRecord | None:
        """A run by config hash, run id, or a unique prefix of either (a literal prefix: `_`
        and `%` are characters, not wildcards). A damaged row raises `DamagedRow`."""
        with self._guard():
            row = self.conn.execute(
                "SELECT * FROM runs WHERE config_hash = ? OR run_id = ?", (key_or_id, key_or_id)
            ).fetchone()
            if row is None and len(key_or_id) >= 4:
                n = len(key_or_id)
                rows = self.conn.execute(
                    "SELECT * FROM runs WHERE substr(run_id, 1, ?) = ? OR substr(config_hash, 1, ?) = ?",
                    (n, key_or_id, n, key_or_id),
                ).fetchall()
                row = rows[0] if len(rows) == 1 else None
        return self._record(row, with_epochs) if row else None

    def finished(self, config_hash: str) -> RunRecord | None:
        """The stored run for this hash if it completed or diverged (both are final results).
        A damaged row counts as missing (noted in `skipped`): re-running replaces it."""
        try:
            rec = self.get(config_hash)
        except DamagedRow as e:
            self.skipped.append((config_hash[:12], str(e)))
            return None
        return rec if rec is not None and rec.status in FINISHED else None

    def epochs(self, run_id: str) -> list[dict[str, Any]]:
        with self._guard():
            rows = self.conn.execute(
                "SELECT epoch, metrics_json FROM epochs WHERE run_id = ? ORDER BY epoch", (run_id,)
            ).fetchall()
        return [_json_dict(m, f"metrics_json of epoch {e}", run_id) for e, m in rows]

    def runs(self, label: str | None = None, status: str | None = None,
             with_epochs: bool = False) -> list[RunRecord]:
        """Stored runs, oldest first; damaged rows are passed over and listed in `skipped`."""
        sql, args = "SELECT * FROM runs WHERE 1=1", []
        if label is not None:
            sql += " AND label = ?"
            args.append(label)
        if status is not None:
            sql += " AND status = ?"
            args.append(status)
        sql += " ORDER BY created_at"
        with self._guard():
            rows = self.conn.execute(sql, args).fetchall()
        out = []
        for r in rows:
            try:
                out.append(self._record(r, with_epochs))
            except DamagedRow as e:
                self.skipped.append((str(r[0]), str(e)))
        return out

    def count(self) -> int:
        with self._guard():
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
        rows = self.export_rows()
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

    # -- checking -------------------------------------------------------------------------------
    def check(self) -> list[str]:
        """Every problem found: SQLite's integrity check, rows whose JSON cannot be read,
        artifacts missing or not matching their recorded sha256. Empty when all is well."""
        from batchlab.runs.upkeep import check_artifacts

        with self._guard():
            problems = [r for (r,) in self.conn.execute("PRAGMA integrity_check") if r != "ok"]
            rows = self.conn.execute("SELECT * FROM runs ORDER BY created_at").fetchall()
            arts = self.conn.execute("SELECT run_id, name, path, sha256 FROM artifacts").fetchall()
        for r in rows:
            try:
                self._record(r, with_epochs=True)
            except DamagedRow as e:
                problems.append(f"damaged row: {e}")
        return problems + check_artifacts(arts)


def _scalar(v: Any) -> Any:
    return json.dumps(v) if isinstance(v, (list, dict, tuple)) else v
