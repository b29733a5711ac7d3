"""Measured results other than training runs, in the same SQLite store (the persistence rule:
every measured result goes through the `Store`, keyed by everything that changes it).

One generic table, `measurements`: a row per result, keyed by the sha256 of the canonical JSON
of its *spec* (config, data fingerprint, checkpoint sha256, device, engine, K, seeds: whatever
changes the numbers). So a rerun with any of these changed never reuses an old row, and a rerun
with none changed reuses every row: an interrupted experiment resumes where it stopped.

Trust nothing that was stored: the payload's sha256 is stored beside it and checked on every
load, and files a row refers to (large tensors kept as .npy) carry their sha256 too. A row that
fails either check is deleted and reported in one line through `warn`, so it is recomputed.
"""

from __future__ import annotations

import copy
import hashlib
import json
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from batchlab.atomic import jsonable, sha256_file
from batchlab.runs.measurement_files import checksum, resolve, stored_path, verify_row
from batchlab.runs.store import Store

SCHEMA = """
CREATE TABLE IF NOT EXISTS measurements (
    key TEXT PRIMARY KEY,
    kind TEXT NOT NULL,
    spec_json TEXT NOT NULL,
    payload_json TEXT NOT NULL,
    checksum TEXT NOT NULL,
    files_json TEXT NOT NULL,
    created_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS measurements_kind ON measurements(kind);
"""

Warn = Callable[[str], None]


def canonical(obj: Any) -> str:
    """Deterministic JSON: sorted keys, no whitespace, NaN/inf written as the strings "nan",
    "inf", "-inf" (not null, as every other document): row keys are the sha256 of this text,
    so its form is part of every stored key, and a reader gets nan and inf back told apart
    (`decode`)."""
    return json.dumps(jsonable(obj, nonfinite=repr), sort_keys=True, separators=(",", ":"),
                      allow_nan=False)


def spec_key(kind: str, spec: Mapping[str, Any]) -> str:
    """The row key: sha256 of the kind and the canonical spec."""
    return hashlib.sha256(canonical({"kind": kind, "spec": spec}).encode()).hexdigest()


def weights_sha256(model: nn.Module) -> str:
    """sha256 of a model's parameters and buffers (names, shapes, dtypes and bytes): the
    identity of the weights a measurement actually ran on, whatever file they came from."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        a = t.detach().to("cpu").contiguous()
        h.update(f"{name}:{tuple(a.shape)}:{a.dtype};".encode())
        if a.numel():
            h.update(memoryview(a.reshape(-1).view(torch.uint8).numpy()))
    return h.hexdigest()


def tensors_sha256(*tensors: torch.Tensor) -> str:
    """sha256 of tensors' shapes, dtypes and bytes (the data a measurement used)."""
    h = hashlib.sha256()
    for t in tensors:
        a = t.detach().to("cpu").contiguous()
        h.update(f"{tuple(a.shape)}:{a.dtype};".encode())
        if a.numel():
            h.update(memoryview(a.reshape(-1).view(torch.uint8).numpy()))
    return h.hexdigest()


class Measurements:
    """Keyed, checksummed rows in a store. The process that holds it is the only writer (the
    executors send results back to the driver), so a row is written once, whole."""

    def __init__(self, store: Store, warn: Warn | None = None) -> None:
        self.store = store
        self._warns = warn is not None
        self.warn = warn or (lambda line: None)
        store.ensure_schema(SCHEMA)

    def get(self, kind: str, spec: Mapping[str, Any]) -> dict[str, Any] | None:
        """The stored payload of (kind, spec), verified; None if absent or damaged (then the
        row is deleted, said in one line, and the caller recomputes)."""
        key = spec_key(kind, spec)
        row = self.store.conn.execute(
            "SELECT payload_json, checksum, files_json FROM measurements WHERE key = ?",
            (key,)).fetchone()
        if row is None:
            return None
        text, recorded, files_json = row
        problem = verify_row(self.store, text, recorded, files_json)
        if problem is not None:
            msg = f"stored {kind} {key[:12]} is not trusted: {problem}; recomputing it"
            self.warn(msg)
            self.store.note(msg, shown=self._warns)
            self.delete(key)
            return None
        return _restore(json.loads(text))

    def put(self, kind: str, spec: Mapping[str, Any], payload: Mapping[str, Any],
            files: Mapping[str, str | Path] | None = None) -> str:
        """Store (or replace) one result; `files` (name -> path) are hashed now and checked
        on every later load. Returns the row key."""
        key = spec_key(kind, spec)
        text = canonical(payload)
        recorded = {name: [stored_path(self.store, p), sha256_file(p)]
                    for name, p in (files or {}).items()}
        with self.store.transaction() as c:
            c.execute("INSERT OR REPLACE INTO measurements VALUES (?,?,?,?,?,?,?)",
                      (key, kind, canonical(spec), text, checksum(text),
                       json.dumps(recorded, sort_keys=True), time.time()))
        return key

    def delete(self, key: str) -> None:
        with self.store.transaction() as c:
            c.execute("DELETE FROM measurements WHERE key = ?", (key,))

    def count(self, kind: str | None = None) -> int:
        if kind is None:
            return self.store.conn.execute("SELECT COUNT(*) FROM measurements").fetchone()[0]
        return self.store.conn.execute(
            "SELECT COUNT(*) FROM measurements WHERE kind = ?", (kind,)).fetchone()[0]

    def has(self, kind: str, spec: Mapping[str, Any]) -> bool:
        """Whether a row exists (unverified: for plans, which must not delete anything)."""
        return self.store.conn.execute(
            "SELECT 1 FROM measurements WHERE key = ?", (spec_key(kind, spec),)
        ).fetchone() is not None

    def cached(self, kind: str, spec: Mapping[str, Any],
               compute: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        """The stored result of (kind, spec), or `compute()`'s, stored before it is returned."""
        got = self.get(kind, spec)
        if got is None:
            got = compute()
            self.put(kind, spec, got)
            got = _restore(json.loads(canonical(got)))  # the same types a reload gives
        return got

    def cached_many(self, units: Sequence[Unit], big: Mapping[str, Any] | None = None, *,
                    executor: str = "local", ray_address: str | None = None,
                    workers: int = 1, cpu: bool = True,
                    on_done: Callable[[int], None] | None = None) -> list[dict[str, Any]]:
        """The stored result of every unit, computing the missing ones as tasks of a pool
        (`batchlab.runs.tasks`: worker threads here, or Ray tasks), each stored as soon as
        it is back, so an interrupted driver or a lost worker loses only the units in
        flight. Tasks run with one intra-op thread in both pools, so local and Ray give the
        same numbers. `big[key]` is the value of each `Big(key)` argument, sent once per
        worker. `on_done(i)` is called as unit i is ready (stored ones first)."""
        from batchlab.runs.tasks import make_pool

        out: list[dict[str, Any] | None] = [self.get(u.kind, u.spec) for u in units]
        for i, got in enumerate(out):
            if got is not None and on_done is not None:
                on_done(i)
        todo = [i for i, got in enumerate(out) if got is None]
        if not todo:
            return out  # type: ignore[return-value]
        pool = make_pool(executor, workers=workers, cpu=cpu, ray_address=ray_address)
        refs: dict[str, Any] = {}

        def arg(a: Any) -> Any:
            if not isinstance(a, Big):
                return a
            value = (big or {})[a.key]
            if executor == "local" and isinstance(value, nn.Module):
                # share nothing mutable: curvature code switches a module's mode and grads, so
                # each thread gets its own copy (a Ray worker unpickles its own anyway)
                return copy.deepcopy(value)
            if a.key not in refs:
                refs[a.key] = pool.shared(a.key, value)
            return refs[a.key]

        queue = list(reversed(todo))
        pending: dict[Any, int] = {}

        # locally a bounded window, so a task's module copy lives only while it runs; Ray
        # shares arguments through its object store and spreads the tasks over the cluster
        window = 2 * max(1, workers) if executor == "local" else len(todo)

        def fill() -> None:
            while queue and len(pending) < window:
                i = queue.pop()
                pending[pool.submit(units[i].fn, *map(arg, units[i].args))] = i

        try:
            fill()
            while pending:
                handle, payload = pool.next_done()
                i = pending.pop(handle)
                self.put(units[i].kind, units[i].spec, payload)
                out[i] = _restore(json.loads(canonical(payload)))  # the types a reload gives
                if on_done is not None:
                    on_done(i)
                fill()
        except BaseException:
            pool.cancel_all()  # every stored row is whole; a rerun resumes from them
            raise
        finally:
            pool.close()
        return out  # type: ignore[return-value]


@dataclass(frozen=True)
class Big:
    """A large argument of a `Unit` (a model, a data tensor), given once in `big`."""

    key: str


@dataclass(frozen=True)
class Unit:
    """One measurement: the row (kind, spec) or, if it is not stored, fn(*args). `fn` must be a
    deterministic module-level function (Ray ships it by reference) returning a JSON-able dict."""

    kind: str
    spec: Mapping[str, Any]
    fn: Callable[..., dict[str, Any]]
    args: tuple[Any, ...] = ()


def decode(payload: Any) -> Any:
    """A payload as stored, with the non-finite floats `canonical` wrote as strings restored."""
    return _restore(payload)


def _restore(obj: Any) -> Any:
    if isinstance(obj, str) and obj in ("nan", "inf", "-inf"):
        return float(obj)
    if isinstance(obj, dict):
        return {k: _restore(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_restore(v) for v in obj]
    return obj


def files_of(store: Store, kind: str, spec: Mapping[str, Any]) -> dict[str, str]:
    """name -> path of the files a stored row refers to (after `get` verified them)."""
    row = store.conn.execute("SELECT files_json FROM measurements WHERE key = ?",
                             (spec_key(kind, spec),)).fetchone()
    return {} if row is None else {n: str(resolve(store, e[0]))
                                   for n, e in json.loads(row[0]).items()}
