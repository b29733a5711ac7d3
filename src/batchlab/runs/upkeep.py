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


def check_artifacts(rows: Iterable[tuple[str, str, str, str]], weights: bool = False) -> list[str]:
    """Problems of (run_id, name, path, sha256) artifact rows: missing files, changed bytes;
    with `weights`, also checkpoints that are not safetensors files or hold NaN/inf weights
    (a completed run's weights are finite; a diverged run's may not be)."""
    from batchlab.atomic import sha256_file

    problems = []
    for run_id, name, path, sha in rows:
        p = Path(path)
        if not p.is_file():
            problems.append(f"run {run_id}: artifact {name} is missing ({path})")
            continue
        try:
            digest = sha256_file(p)
        except OSError as e:
            problems.append(f"run {run_id}: artifact {name} cannot be read ({path}: {e.strerror})")
            continue
        if digest != sha:
            problems.append(f"run {run_id}: artifact {name} does not match its recorded sha256 ({path})")
        elif weights and p.name.endswith(".safetensors"):
            why = _weights_problem(p)
            if why is not None:
                problems.append(f"run {run_id}: artifact {name} {why} ({path})")
    return problems


def _weights_problem(path: Path) -> str | None:
    """Why a checkpoint file cannot be used as weights (None: it can)."""
    import torch
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        state = load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError):
        return "is not a safetensors file"
    bad = [k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    return f"holds NaN or infinite weights ({', '.join(bad[:3])})" if bad else None
