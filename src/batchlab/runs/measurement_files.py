"""Where a measurement's files live and whether a stored measurement row can be trusted.

Apart from `measurements` because the store's own audit (`store_audit`) verifies these rows
too, and it must not import the module that imports the store. `store` is a `Store` (any
object with `path`, `artifacts_dir` and `relative_artifact`).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from batchlab.atomic import sha256_file
from batchlab.errors import BatchlabError


def checksum(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


ARTIFACTS_TAG = "@artifacts/"


def stored_path(store: Any, path: str | Path) -> str:
    """A measurement file's path as stored: `@artifacts/REL` inside the store's artifact
    folder, else relative to the store's folder (both move with the store), absolute only
    when neither applies (another drive)."""
    rel = store.relative_artifact(path)
    if not Path(rel).is_absolute():
        return ARTIFACTS_TAG + rel
    import os

    try:
        return Path(os.path.relpath(rel, store.path.absolute().parent)).as_posix()
    except ValueError:
        return rel


def resolve(store: Any, stored: str) -> Path:
    """A stored measurement file path as a path to open now (absolute: written by an older
    batchlab, used as it is)."""
    if stored.startswith(ARTIFACTS_TAG):
        return store.artifacts_dir / stored[len(ARTIFACTS_TAG):]
    p = Path(stored)
    return p if p.is_absolute() else store.path.absolute().parent / p


def verify_row(store: Any, text: str, recorded: str, files_json: str) -> str | None:
    """Why a measurement row cannot be trusted (None: it can): payload checksum, JSON, and
    the sha256 of every file it refers to."""
    if checksum(str(text)) != recorded:
        return "its checksum does not match (edited or corrupted)"
    try:
        json.loads(text)
        files = json.loads(files_json)
    except (json.JSONDecodeError, TypeError):
        return "it is not valid JSON"
    if not isinstance(files, dict):
        return "its file list is malformed"
    return check_files(store, files)


def check_files(store: Any, files: Mapping[str, Any]) -> str | None:
    for name, entry in files.items():
        try:
            path, sha = entry
        except (TypeError, ValueError):
            return f"file entry {name!r} is malformed"
        p = resolve(store, str(path))
        if not p.is_file():
            return f"its file {p} is missing"
        try:
            if sha256_file(p) != sha:
                return f"its file {p} does not match its sha256"
        except OSError as e:
            raise BatchlabError(f"cannot read {p}: {e}") from None
    return None
