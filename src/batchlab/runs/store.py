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

Trust nothing stored (schema 2): every run row carries the sha256 of its own columns, its epochs
and its artifact rows (`checksum`), so a hand-edited row is a damaged row, never a result. A
finished run whose row or checkpoint files fail verification is treated as absent: running its
config again recomputes and replaces it. Artifact paths are stored relative to the store's
artifact folder (`NAME.artifacts`) and resolved against the store's location when read, so a
store copied, renamed or moved with its folder works from any working directory; paths of
schema-1 stores (relative to the working directory of the time, or absolute) are found by their
run folder and file name inside the artifact folder.

An intact store that cannot be opened because its folder is read-only or its disk is full is
named as such (`StoreUnavailable`), never as damaged (`DamagedStore`).
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import shutil
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
SCHEMA_VERSION = 2  # 2: runs.checksum, artifact paths relative to the artifact folder
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
RUN_COLUMNS = ("run_id, config_hash, config_json, seed, status, error, label, created_at, "
               "wall_seconds, env_json, final_json")
STATUSES = ("completed", "diverged", "failed")
LOW_SPACE = 1 << 20  # free bytes below which an SQLite I/O failure is taken for a full disk


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
    """A stored row that cannot be trusted: JSON that cannot be read, a value of the wrong kind,
    or a checksum that does not match (hand-edited or corrupted)."""


class DamagedStore(BatchlabError):
    """The store file itself is damaged (SQLite cannot read it)."""


class StoreUnavailable(BatchlabError):
    """An intact store that cannot be used here and now: a read-only folder, a full disk."""


def row_checksum(row: tuple[Any, ...], epochs: list[tuple[Any, Any]],
                 artifacts: list[tuple[Any, Any, Any]]) -> str:
    """sha256 of a run row's columns (the 11 of `RUN_COLUMNS`), its epoch rows (epoch,
    metrics_json) by epoch and its artifact rows (name, path, sha256) by name."""
    doc = [list(row[:11]), [list(e) for e in sorted(epochs, key=lambda e: str(e[0]))],
           [list(a) for a in sorted(artifacts, key=lambda a: str(a[0]))]]
    text = json.dumps(doc, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def _low_space(folder: Path) -> bool:
    try:
        return shutil.disk_usage(folder).free < LOW_SPACE
    except OSError:
        return False


def _writable_folder(folder: Path) -> bool:
    return os.access(folder, os.W_OK | os.X_OK)

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
        self.warnings: list[tuple[str, bool]] = []  # (message, already shown) of distrusted data
        self._refuse_non_sqlite()
        folder = self.path.absolute().parent
        if not readonly and self.path.exists() and not _writable_folder(folder):
            raise StoreUnavailable(
                f"results store {self.path} cannot be written: its folder {folder} is read-only "
                f"(SQLite keeps {self.path.name}-wal and -shm beside the store); the store is "
                f"intact: make the folder writable, or copy the store elsewhere")
        try:
            if readonly:
                uri = f"file:{quote(str(self.path.absolute()))}?mode=ro"
                wal = self.path.with_name(self.path.name + "-wal")
                if not _writable_folder(folder) and not (wal.exists() and wal.stat().st_size):
                    # nobody can be writing a store in a read-only folder, and SQLite could not
                    # create the -shm it needs to read a WAL store there
                    uri += "&immutable=1"
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
                self._migrate()
            self.signed = "checksum" in self._run_columns()
        if not readonly:
            self.removed = self.clean_leftovers()

    def _run_columns(self) -> list[str]:
        return [r[1] for r in self.conn.execute("PRAGMA table_info(runs)")]

    def _migrate(self) -> None:
        """Schema 1 -> 2: add `runs.checksum` and sign the rows already there (in one
        transaction; a concurrent opener finds the work done)."""
        if "checksum" in self._run_columns():
            return
        self.conn.execute("BEGIN IMMEDIATE")
        try:
            if "checksum" not in self._run_columns():
                self.conn.execute("ALTER TABLE runs ADD COLUMN checksum TEXT")
                rows = self.conn.execute(f"SELECT {RUN_COLUMNS} FROM runs").fetchall()
                for row in rows:
                    self.conn.execute("UPDATE runs SET checksum = ? WHERE run_id = ?",
                                      (row_checksum(row, *self._children(row[0])), row[0]))
            self.conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
        except BaseException:
            self.conn.execute("ROLLBACK")
            raise
        self.conn.execute("COMMIT")

    def _children(self, run_id: str) -> tuple[list[tuple[Any, Any]], list[tuple[Any, Any, Any]]]:
        """A run's raw epoch rows and artifact rows (what its checksum covers)."""
        epochs = self.conn.execute("SELECT epoch, metrics_json FROM epochs WHERE run_id = ? "
                                   "ORDER BY epoch", (run_id,)).fetchall()
        arts = self.conn.execute("SELECT name, path, sha256 FROM artifacts WHERE run_id = ? "
                                 "ORDER BY name", (run_id,)).fetchall()
        return epochs, arts

    def note(self, message: str, shown: bool = False) -> None:
        """Record a warning about distrusted stored data (the CLI prints every one, --quiet or
        not; `shown`: already printed through a progress log)."""
        if all(message != m for m, _ in self.warnings):  # a run looked up twice: said once
            self.warnings.append((message, shown))

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
        """SQLite failures as one-line errors that name the file and what to do. A full disk or
        a read-only folder is said as such: calling an intact store damaged would push users to
        throw good results away."""
        try:
            yield
        except sqlite3.IntegrityError:
            raise
        except sqlite3.DatabaseError as e:
            msg = str(e)
            folder = self.path.absolute().parent
            if "locked" in msg or "busy" in msg:
                raise BatchlabError(f"results store {self.path} stayed locked by another process "
                                    f"for 60 s; try again when it has finished") from None
            if "full" in msg or (("I/O" in msg or "unable to open" in msg)
                                 and _low_space(folder)):
                raise StoreUnavailable(
                    f"the disk holding results store {self.path} is full ({msg}); the store is "
                    f"intact: free some space and run again") from None
            if "readonly" in msg or "read-only" in msg or "unable to open" in msg:
                if not _writable_folder(folder):
                    raise StoreUnavailable(
                        f"results store {self.path} cannot be used here: its folder {folder} is "
                        f"read-only ({msg}); the store is intact: make the folder writable or "
                        f"copy the store elsewhere") from None
                if "unable to open" not in msg:
                    raise StoreUnavailable(f"results store {self.path} is read-only") from None
                if not os.access(self.path, os.R_OK):
                    raise StoreUnavailable(f"results store {self.path} cannot be read "
                                           f"(permission denied)") from None
            raise DamagedStore(
                f"results store {self.path} is damaged ({msg}); restore it from a backup, or "
                f"move it away (its runs are recomputed when their configs run again); `batchlab "
                f"runs check --store {self.path}` tells what is still readable") from None

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

    # -- artifact paths ---------------------------------------------------------------------
    def relative_artifact(self, path: str | Path) -> str:
        """How a file's path is stored: relative to the artifact folder when it lies inside it
        (so the store can move with its folder), else absolute."""
        p = Path(path).absolute()
        try:
            return p.relative_to(self.artifacts_dir.absolute()).as_posix()
        except ValueError:
            pass
        try:
            return Path(p).resolve().relative_to(self.artifacts_dir.resolve()).as_posix()
        except ValueError:
            return str(p.resolve())

    def artifact_path(self, stored: str) -> Path:
        """A stored artifact path as a path to open now. Schema-2 paths are relative to the
        artifact folder; older ones (relative to some working directory, or absolute, with the
        store's name in them) are found by what follows their `*.artifacts` folder."""
        p = Path(stored)
        parts = p.parts
        cut = [i for i, part in enumerate(parts) if part.endswith(".artifacts")]
        if not p.is_absolute() and not cut and ".." not in parts:
            return self.artifacts_dir / p
        if cut:
            inside = self.artifacts_dir.joinpath(*parts[cut[-1] + 1:])
            if inside.exists() or not p.exists():
                return inside
        return p

    # -- writing ------------------------------------------------------------------------------
    def save_run(self, rec: RunRecord) -> None:
        """Insert or replace a run with all its epochs and artifacts, atomically, signed with
        its checksum; artifact paths are stored relative to the artifact folder."""
        row = (rec.run_id, rec.config_hash, json.dumps(rec.config, sort_keys=True),
               rec.seed, rec.status, rec.error, rec.label, rec.created_at,
               rec.wall_seconds, json.dumps(rec.env), json.dumps(rec.final))
        epochs = [(int(e["epoch"]), json.dumps(e)) for e in rec.epochs]
        arts = [(n, self.relative_artifact(p), s) for n, (p, s) in rec.artifacts.items()]
        with self.transaction() as c:
            c.execute("DELETE FROM runs WHERE config_hash = ? OR run_id = ?",
                      (rec.config_hash, rec.run_id))
            if self.signed:
                c.execute(f"INSERT INTO runs ({RUN_COLUMNS}, checksum) VALUES "
                          f"(?,?,?,?,?,?,?,?,?,?,?,?)", (*row, row_checksum(row, epochs, arts)))
            else:  # pragma: no cover - a writable store is always migrated
                c.execute(f"INSERT INTO runs ({RUN_COLUMNS}) VALUES (?,?,?,?,?,?,?,?,?,?,?)",
                          row)
            c.executemany("INSERT INTO epochs VALUES (?,?,?)",
                          [(rec.run_id, e, m) for e, m in epochs])
            c.executemany("INSERT INTO artifacts VALUES (?,?,?,?)",
                          [(rec.run_id, n, p, s) for n, p, s in arts])

    def delete(self, run_ids: list[str]) -> int:
        """Delete runs (rows, epochs, artifacts and their checkpoint folders); their configs
        are recomputed when run again. Returns how many rows went."""
        if self.readonly:
            raise BatchlabError(f"results store {self.path} was opened read-only")
        n = 0
        with self.transaction() as c:
            for rid in run_ids:
                c.execute("DELETE FROM epochs WHERE run_id = ?", (rid,))
                c.execute("DELETE FROM artifacts WHERE run_id = ?", (rid,))
                n += c.execute("DELETE FROM runs WHERE run_id = ?", (rid,)).rowcount
        for rid in run_ids:
            folder = self.artifacts_dir / rid
            if rid and "/" not in rid and rid not in (".", "..") and folder.is_dir():
                shutil.rmtree(folder, ignore_errors=True)
        return n

    # -- reading ------------------------------------------------------------------------------
    def _select(self) -> str:
        return f"SELECT {RUN_COLUMNS}{', checksum' if self.signed else ''} FROM runs"

    def _record(self, row: sqlite3.Row | tuple, with_epochs: bool = True) -> RunRecord:
        """A row as a RunRecord; `DamagedRow` if any of its JSON cannot be read, a value is of
        the wrong kind, or (schema 2) its checksum does not match."""
        (run_id, chash, cfg, seed, status, error, label, created, wall, env, final) = row[:11]
        with self._guard():
            epoch_rows, art_rows = self._children(run_id)
        if status not in STATUSES:
            raise DamagedRow(f"run {run_id}: status {str(status)[:40]!r} is not one of "
                             f"{', '.join(STATUSES)}")
        if not isinstance(seed, int) or isinstance(seed, bool):
            raise DamagedRow(f"run {run_id}: seed {str(seed)[:40]!r} is not an integer")
        rec = RunRecord(
            run_id=run_id, config_hash=chash, config=_json_dict(cfg, "config_json", run_id),
            seed=seed, status=status, error=error, label=label, created_at=created,
            wall_seconds=wall, env=_json_dict(env or "{}", "env_json", run_id),
            final=_json_dict(final or "{}", "final_json", run_id),
        )
        epochs = [_json_dict(m, f"metrics_json of epoch {e}", run_id) for e, m in epoch_rows]
        if self.signed and row[11] != row_checksum(row, epoch_rows, art_rows):
            raise DamagedRow(f"run {run_id}: its row does not match its checksum (edited or "
                             f"corrupted)")
        if with_epochs:
            rec.epochs = epochs
            rec.artifacts = {n: (str(self.artifact_path(p)), s) for n, p, s in art_rows}
        return rec

    def get(self, key_or_id: str, with_epochs: bool = True) -> RunRecord | None:
        """A run by config hash, run id, or a unique prefix of either (a literal prefix: `_`
        and `%` are characters, not wildcards). A damaged row raises `DamagedRow`."""
        with self._guard():
            row = self.conn.execute(
                f"{self._select()} WHERE config_hash = ? OR run_id = ?", (key_or_id, key_or_id)
            ).fetchone()
            if row is None and len(key_or_id) >= 4:
                n = len(key_or_id)
                rows = self.conn.execute(
                    f"{self._select()} WHERE substr(run_id, 1, ?) = ? OR "
                    f"substr(config_hash, 1, ?) = ?", (n, key_or_id, n, key_or_id),
                ).fetchall()
                row = rows[0] if len(rows) == 1 else None
        return self._record(row, with_epochs) if row else None

    def finished(self, config_hash: str) -> RunRecord | None:
        """The stored run for this hash if it completed or diverged (both are final results)
        and every part of it verifies. A damaged row, or a checkpoint that is missing or not
        the file that was written, counts as missing (noted in `skipped` and `warnings`):
        re-running replaces it."""
        try:
            rec = self.get(config_hash)
        except DamagedRow as e:
            self.skipped.append((config_hash[:12], str(e)))
            self.note(f"stored {e}; recomputing it")
            return None
        if rec is None or rec.status not in FINISHED:
            return None
        from batchlab.runs.upkeep import check_artifacts

        bad = check_artifacts((rec.run_id, n, p, sh) for n, (p, sh) in rec.artifacts.items())
        if bad:
            self.skipped.append((rec.run_id, bad[0]))
            self.note(f"stored {bad[0]}; recomputing the run")
            return None
        return rec

    def epochs(self, run_id: str) -> list[dict[str, Any]]:
        with self._guard():
            rows = self.conn.execute(
                "SELECT epoch, metrics_json FROM epochs WHERE run_id = ? ORDER BY epoch", (run_id,)
            ).fetchall()
        return [_json_dict(m, f"metrics_json of epoch {e}", run_id) for e, m in rows]

    def runs(self, label: str | None = None, status: str | None = None,
             with_epochs: bool = False) -> list[RunRecord]:
        """Stored runs, oldest first; damaged rows are passed over and listed in `skipped`."""
        sql, args = f"{self._select()} WHERE 1=1", []
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

    def match(self, key_or_id: str) -> str | None:
        """The run id of a run by id, config hash or unique prefix, without reading the row
        (a damaged row can be matched, to delete it)."""
        with self._guard():
            row = self.conn.execute("SELECT run_id FROM runs WHERE config_hash = ? OR run_id = ?",
                                    (key_or_id, key_or_id)).fetchone()
            if row is None and len(key_or_id) >= 4:
                n = len(key_or_id)
                rows = self.conn.execute(
                    "SELECT run_id FROM runs WHERE substr(run_id, 1, ?) = ? OR "
                    "substr(config_hash, 1, ?) = ?", (n, key_or_id, n, key_or_id)).fetchall()
                row = rows[0] if len(rows) == 1 else None
        return None if row is None else str(row[0])

    def run_ids(self, label: str | None = None, status: str | None = None) -> list[str]:
        """Ids of stored runs (damaged rows included: for deleting)."""
        sql, args = "SELECT run_id FROM runs WHERE 1=1", []
        if label is not None:
            sql += " AND label = ?"
            args.append(label)
        if status is not None:
            sql += " AND status = ?"
            args.append(status)
        with self._guard():
            return [str(r) for (r,) in self.conn.execute(sql + " ORDER BY created_at", args)]

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
        """Every problem found: SQLite's integrity check, rows that cannot be trusted (JSON,
        status, seed, checksum), checkpoints missing, not matching their recorded sha256, not
        safetensors files or (for a completed run) holding NaN/inf weights, and measurement
        rows or files that fail their checksums. Empty when all is well."""
        return [p for _, p in self.check_runs()]

    def check_runs(self) -> list[tuple[str | None, str]]:
        """`check`'s problems as (run_id or None, problem): the run ids are what
        `batchlab runs delete --damaged` deletes."""
        from batchlab.runs.upkeep import check_artifacts

        with self._guard():
            problems: list[tuple[str | None, str]] = [
                (None, r) for (r,) in self.conn.execute("PRAGMA integrity_check") if r != "ok"]
            rows = self.conn.execute(f"{self._select()} ORDER BY created_at").fetchall()
        for r in rows:
            try:
                rec = self._record(r, with_epochs=True)
            except DamagedRow as e:
                problems.append((str(r[0]), f"damaged row: {e}"))
                continue
            arts = [(rec.run_id, n, p, sh) for n, (p, sh) in rec.artifacts.items()]
            found = check_artifacts(arts, weights=rec.status == "completed")
            problems += [(rec.run_id, p) for p in found]
        return problems + [(None, p) for p in self._check_measurements()]

    def _check_measurements(self) -> list[str]:
        if self.conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND "
                             "name = 'measurements'").fetchone() is None:
            return []
        from batchlab.runs.measurements import verify_row

        with self._guard():
            rows = self.conn.execute("SELECT key, kind, payload_json, checksum, files_json "
                                     "FROM measurements ORDER BY created_at").fetchall()
        out = []
        for key, kind, text, checksum, files in rows:
            problem = verify_row(self, text, checksum, files)
            if problem is not None:
                out.append(f"measurement {kind} {str(key)[:12]}: {problem} (recomputed when "
                           f"the experiment runs again)")
        return out


def salvage(path: Path) -> tuple[int, int]:
    """What of a damaged store SQLite can still read, opened read-only and immutable (nothing
    is written): (run rows, epoch rows), each 0 when its table cannot be read at all."""
    uri = f"file:{quote(str(Path(path).absolute()))}?mode=ro&immutable=1"
    counts = []
    try:
        conn = sqlite3.connect(uri, uri=True, isolation_level=None)
    except sqlite3.Error:
        return 0, 0
    try:
        for table in ("runs", "epochs"):
            n = 0
            try:
                for _ in conn.execute(f"SELECT * FROM {table}"):
                    n += 1
            except sqlite3.Error:
                pass
            counts.append(n)
    finally:
        conn.close()
    return counts[0], counts[1]


def _scalar(v: Any) -> Any:
    return json.dumps(v) if isinstance(v, (list, dict, tuple)) else v
