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

import shutil
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import quote

from batchlab.atomic import check_writable, to_json
from batchlab.errors import BatchlabError
from batchlab.runs import store_schema as schema
from batchlab.runs.store_schema import (
    APPLICATION_ID,
    FINISHED,
    RUN_COLUMNS,
    SCHEMA,
    SCHEMA_VERSION,
    STATUSES,
    DamagedRow,
    DamagedStore,
    RunRecord,
    StoreUnavailable,
    json_dict,
    row_checksum,
    salvage,
)

__all__ = ["APPLICATION_ID", "DEFAULT_STORE", "FINISHED", "RUN_COLUMNS", "SCHEMA",
           "SCHEMA_VERSION", "DamagedRow", "DamagedStore", "RunRecord", "Store",
           "StoreUnavailable", "row_checksum", "salvage"]

DEFAULT_STORE = "batchlab.db"


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
        schema.refuse_non_sqlite(self.path)
        folder = self.path.absolute().parent
        if not readonly and self.path.exists() and not schema.writable_folder(folder):
            raise StoreUnavailable(
                f"results store {self.path} cannot be written: its folder {folder} is read-only "
                f"(SQLite keeps {self.path.name}-wal and -shm beside the store); the store is "
                f"intact: make the folder writable, or copy the store elsewhere")
        try:
            if readonly:
                uri = f"file:{quote(str(self.path.absolute()))}?mode=ro"
                wal = self.path.with_name(self.path.name + "-wal")
                if not schema.writable_folder(folder) and not (wal.exists() and wal.stat().st_size):
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
            fresh = schema.identify(self.conn, self.path, readonly)
            if not readonly:
                self.conn.execute("PRAGMA journal_mode=WAL")
                self.conn.execute("PRAGMA synchronous=NORMAL")
                self.conn.execute("PRAGMA foreign_keys=ON")
                if fresh:
                    self.conn.execute(f"PRAGMA application_id={APPLICATION_ID}")
                    self.conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
                self.conn.executescript(SCHEMA)
                schema.migrate(self.conn)
            self.signed = "checksum" in schema.run_columns(self.conn)
        if not readonly:
            self.removed = self.clean_leftovers()

    def note(self, message: str, shown: bool = False) -> None:
        """Record a warning about distrusted stored data (the CLI prints every one, --quiet or
        not; `shown`: already printed through a progress log)."""
        if all(message != m for m, _ in self.warnings):  # a run looked up twice: said once
            self.warnings.append((message, shown))

    @contextmanager
    def _guard(self) -> Iterator[None]:
        """SQLite failures as one-line errors that name the file and what to do
        (`store_schema.sqlite_error`)."""
        try:
            yield
        except sqlite3.IntegrityError:
            raise
        except sqlite3.DatabaseError as e:
            raise schema.sqlite_error(self.path, e) from None

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
        its checksum; artifact paths are stored relative to the artifact folder. Metrics are
        strict JSON (a NaN loss is stored as null)."""
        row = (rec.run_id, rec.config_hash, to_json(rec.config, sort_keys=True),
               rec.seed, rec.status, rec.error, rec.label, rec.created_at,
               rec.wall_seconds, to_json(rec.env), to_json(rec.final))
        epochs = [(int(e["epoch"]), to_json(e)) for e in rec.epochs]
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
            epoch_rows, art_rows = schema.children(self.conn, run_id)
        if status not in STATUSES:
            raise DamagedRow(f"run {run_id}: status {str(status)[:40]!r} is not one of "
                             f"{', '.join(STATUSES)}")
        if not isinstance(seed, int) or isinstance(seed, bool):
            raise DamagedRow(f"run {run_id}: seed {str(seed)[:40]!r} is not an integer")
        rec = RunRecord(
            run_id=run_id, config_hash=chash, config=json_dict(cfg, "config_json", run_id),
            seed=seed, status=status, error=error, label=label, created_at=created,
            wall_seconds=wall, env=json_dict(env or "{}", "env_json", run_id),
            final=json_dict(final or "{}", "final_json", run_id),
        )
        epochs = [json_dict(m, f"metrics_json of epoch {e}", run_id) for e, m in epoch_rows]
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
        row = self._lookup(self._select(), key_or_id)
        return self._record(row, with_epochs) if row else None

    def _lookup(self, select: str, key_or_id: str) -> tuple | None:
        """The one row of `select` whose config hash or run id is `key_or_id`, else the one
        whose either starts with it (4+ characters, a literal prefix); None if none or several."""
        with self._guard():
            row = self.conn.execute(f"{select} WHERE config_hash = ? OR run_id = ?",
                                    (key_or_id, key_or_id)).fetchone()
            if row is None and len(key_or_id) >= 4:
                n = len(key_or_id)
                rows = self.conn.execute(
                    f"{select} WHERE substr(run_id, 1, ?) = ? OR substr(config_hash, 1, ?) = ?",
                    (n, key_or_id, n, key_or_id)).fetchall()
                row = rows[0] if len(rows) == 1 else None
        return row

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
        return [json_dict(m, f"metrics_json of epoch {e}", run_id) for e, m in rows]

    def runs(self, label: str | None = None, status: str | None = None,
             with_epochs: bool = False) -> list[RunRecord]:
        """Stored runs, oldest first; damaged rows are passed over and listed in `skipped`."""
        where, args = _filters(label, status)
        with self._guard():
            rows = self.conn.execute(f"{self._select()}{where} ORDER BY created_at", args).fetchall()
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
        row = self._lookup("SELECT run_id FROM runs", key_or_id)
        return None if row is None else str(row[0])

    def run_ids(self, label: str | None = None, status: str | None = None) -> list[str]:
        """Ids of stored runs (damaged rows included: for deleting)."""
        where, args = _filters(label, status)
        with self._guard():
            return [str(r) for (r,) in self.conn.execute(
                f"SELECT run_id FROM runs{where} ORDER BY created_at", args)]

    def count(self) -> int:
        with self._guard():
            return self.conn.execute("SELECT COUNT(*) FROM runs").fetchone()[0]

    # -- checking and export: `store_audit` -----------------------------------------------------
    def check_runs(self) -> list[tuple[str | None, str]]:
        """`check`'s problems as (run_id or None, problem): the run ids are what
        `batchlab runs delete --damaged` deletes."""
        from batchlab.runs.store_audit import check_runs

        return check_runs(self)

    def export_rows(self) -> list[dict[str, Any]]:
        """One flat row per (run, epoch): config fields prefixed `cfg_`, then the metrics."""
        from batchlab.runs.store_audit import export_rows

        return export_rows(self)

    def export(self, path: Path, fmt: str = "csv") -> int:
        """Write every (run, epoch) row to `path` atomically (never a half file)."""
        from batchlab.runs.store_audit import export

        return export(self, path, fmt)

    def check(self) -> list[str]:
        """Every problem found: SQLite's integrity check, rows that cannot be trusted (JSON,
        status, seed, checksum), checkpoints missing, not matching their recorded sha256, not
        safetensors files or (for a completed run) holding NaN/inf weights, and measurement
        rows or files that fail their checksums. Empty when all is well."""
        return [p for _, p in self.check_runs()]


def _filters(label: str | None, status: str | None) -> tuple[str, list[str]]:
    """The WHERE clause (and its arguments) of a listing by label and/or status."""
    conds = [(c, v) for c, v in (("label = ?", label), ("status = ?", status)) if v is not None]
    where = " WHERE " + " AND ".join(c for c, _ in conds) if conds else ""
    return where, [v for _, v in conds]
