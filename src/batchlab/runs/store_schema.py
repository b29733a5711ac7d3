"""What a results store file is, below the `Store` class: its SQLite schema and marks, the row
type, the errors, each row's checksum, and how an open SQLite failure is named.

Apart from `store` so that the class reads as the operations on runs, and so that other
modules (the migration, the audit, salvage of a damaged file) can use these facts without
a handle on an open store.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sqlite3
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

from batchlab.atomic import to_json
from batchlab.errors import BatchlabError

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


def low_space(folder: Path) -> bool:
    try:
        return shutil.disk_usage(folder).free < LOW_SPACE
    except OSError:
        return False


def writable_folder(folder: Path) -> bool:
    return os.access(folder, os.W_OK | os.X_OK)

def json_dict(text: Any, what: str, run_id: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except (TypeError, ValueError):
        value = None
    if not isinstance(value, dict):
        raise DamagedRow(f"run {run_id}: {what} is not a JSON object")
    return value


def refuse_non_sqlite(path: Path) -> None:
    """A non-empty file that is not SQLite is refused before anything opens it."""
    try:
        with open(path, "rb") as f:
            head = f.read(len(SQLITE_MAGIC))
    except FileNotFoundError:
        return
    except OSError as e:
        raise BatchlabError(f"cannot read results store {path}: {e.strerror}") from None
    if head and head != SQLITE_MAGIC:
        raise BatchlabError(
            f"{path} is not a results store (not an SQLite file: damaged, or another "
            f"kind of file); restore it from a backup or move it away, or pass another --store")


def identify(conn: sqlite3.Connection, path: Path, readonly: bool) -> bool:
    """Check the file is a batchlab store before anything is written; True for a new one
    (or an older store being adopted) that needs its marks set."""
    app_id = conn.execute("PRAGMA application_id").fetchone()[0]
    version = conn.execute("PRAGMA user_version").fetchone()[0]
    tables = {n for (n,) in conn.execute(
        "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%'")}
    if app_id == APPLICATION_ID:
        if version > SCHEMA_VERSION:
            raise BatchlabError(f"results store {path} was written by a newer batchlab "
                                f"(schema {version}); upgrade batchlab to read it")
        return False
    if app_id != 0:
        raise BatchlabError(f"{path} is another program's SQLite database "
                            f"(application_id {app_id}), not a results store; pass another --store")
    if not tables:
        if readonly:
            raise BatchlabError(f"{path} is an empty file, not a results store")
        return True
    own = {t: [r[1] for r in conn.execute(f"PRAGMA table_info({t})")] for t in COLUMNS}
    if own == COLUMNS:
        return True  # an older store of batchlab (before the marks): adopt it
    what = ("its `runs` table is not batchlab's" if "runs" in tables
            else f"it holds tables {', '.join(sorted(tables)[:5])}")
    raise BatchlabError(f"{path} is another program's SQLite database ({what}), "
                        f"not a results store; pass another --store")


def run_columns(conn: sqlite3.Connection) -> list[str]:
    return [r[1] for r in conn.execute("PRAGMA table_info(runs)")]


def children(conn: sqlite3.Connection, run_id: str
             ) -> tuple[list[tuple[Any, Any]], list[tuple[Any, Any, Any]]]:
    """A run's raw epoch rows and artifact rows (what its checksum covers)."""
    epochs = conn.execute("SELECT epoch, metrics_json FROM epochs WHERE run_id = ? "
                          "ORDER BY epoch", (run_id,)).fetchall()
    arts = conn.execute("SELECT name, path, sha256 FROM artifacts WHERE run_id = ? "
                        "ORDER BY name", (run_id,)).fetchall()
    return epochs, arts


def migrate(conn: sqlite3.Connection) -> None:
    """Schema 1 -> 2: add `runs.checksum` and sign the rows already there (in one
    transaction; a concurrent opener finds the work done)."""
    if "checksum" in run_columns(conn):
        return
    conn.execute("BEGIN IMMEDIATE")
    try:
        if "checksum" not in run_columns(conn):
            conn.execute("ALTER TABLE runs ADD COLUMN checksum TEXT")
            rows = conn.execute(f"SELECT {RUN_COLUMNS} FROM runs").fetchall()
            for row in rows:
                conn.execute("UPDATE runs SET checksum = ? WHERE run_id = ?",
                             (row_checksum(row, *children(conn, row[0])), row[0]))
        conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


def sqlite_error(path: Path, e: sqlite3.DatabaseError) -> BatchlabError:
    """The one-line error for an SQLite failure on the store at `path`. A full disk or a
    read-only folder is said as such: calling an intact store damaged would push users to
    throw good results away."""
    msg = str(e)
    folder = path.absolute().parent
    if "locked" in msg or "busy" in msg:
        return BatchlabError(f"results store {path} stayed locked by another process "
                             f"for 60 s; try again when it has finished")
    if "full" in msg or (("I/O" in msg or "unable to open" in msg) and low_space(folder)):
        return StoreUnavailable(
            f"the disk holding results store {path} is full ({msg}); the store is "
            f"intact: free some space and run again")
    if "readonly" in msg or "read-only" in msg or "unable to open" in msg:
        if not writable_folder(folder):
            return StoreUnavailable(
                f"results store {path} cannot be used here: its folder {folder} is "
                f"read-only ({msg}); the store is intact: make the folder writable or "
                f"copy the store elsewhere")
        if "unable to open" not in msg:
            return StoreUnavailable(f"results store {path} is read-only")
        if not os.access(path, os.R_OK):
            return StoreUnavailable(f"results store {path} cannot be read "
                                    f"(permission denied)")
    return DamagedStore(
        f"results store {path} is damaged ({msg}); restore it from a backup, or "
        f"move it away (its runs are recomputed when their configs run again); `batchlab "
        f"runs check --store {path}` tells what is still readable")


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


def scalar(v: Any) -> Any:
    return to_json(v) if isinstance(v, (list, dict, tuple)) else v
