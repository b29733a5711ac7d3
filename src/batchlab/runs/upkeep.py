"""Upkeep of a store's artifacts folder: what killed writers left behind, and files that no
longer match the sha256 the store recorded for them."""

from __future__ import annotations

import re
import shutil
import time
from collections.abc import Iterable
from pathlib import Path

from batchlab.atomic import STALE_SECONDS, leftovers

RUN_DIR = re.compile(r"[0-9a-f]{12}")
CHECKPOINT_FILE = re.compile(r"epoch\d{4}\.safetensors")


def clean_artifacts(directory: Path, known_runs: set[str],
                    stale_seconds: float = STALE_SECONDS) -> list[Path]:
    """Remove temporary files of dead writers (`batchlab.atomic.leftovers`) and checkpoint
    folders of runs the store never recorded (a SIGKILL between saving the files and storing
    the run). A folder is removed only once untouched for `stale_seconds`, so a run saving its
    checkpoints right now keeps them; a folder holding anything but checkpoints is left alone."""
    removed = []
    for p in leftovers(directory, stale_seconds):
        p.unlink(missing_ok=True)
        removed.append(p)
    if not directory.is_dir():
        return removed
    now = time.time()
    for sub in directory.iterdir():
        if not sub.is_dir() or sub.name in known_runs or not RUN_DIR.fullmatch(sub.name):
            continue
        try:
            files = list(sub.iterdir())
            if not all(f.is_file() and CHECKPOINT_FILE.fullmatch(f.name) for f in files):
                continue
            newest = max([sub.stat().st_mtime, *(f.stat().st_mtime for f in files)])
        except OSError:  # changed under us: someone is writing it
            continue
        if now - newest > stale_seconds:
            shutil.rmtree(sub, ignore_errors=True)
            removed.append(sub)
    return removed


def check_artifacts(rows: Iterable[tuple[str, str, str, str]]) -> list[str]:
    """Problems of (run_id, name, path, sha256) artifact rows: missing files, changed bytes."""
    from batchlab.data.idx import sha256_file

    problems = []
    for run_id, name, path, sha in rows:
        p = Path(path)
        if not p.is_file():
            problems.append(f"run {run_id}: artifact {name} is missing ({path})")
        elif sha256_file(p) != sha:
            problems.append(f"run {run_id}: artifact {name} does not match its recorded sha256 ({path})")
    return problems
