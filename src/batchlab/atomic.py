"""The one way batchlab writes a file: to a temporary name beside it, then `os.replace`.

A reader (or a crash at any instant) sees the old file or the new one, never half of one. The
temporary names share one pattern (`.NAME.PID.RANDOM.tmp`), so leftovers of a killed process can
be found and removed by `leftovers()`: the writer's pid in the name tells a live writer's file
(never touched) from a dead one's. `check_writable` tells, before any work starts, whether a
path the user gave can be written at all.
"""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from batchlab.errors import BatchlabError

TMP_SUFFIX = ".tmp"
STALE_SECONDS = 600.0
"""A temporary file (or unclaimed artifact) untouched this long belongs to no live write."""


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on a clean exit it replaces `path`, on an
    exception it is deleted. The caller writes the temporary path however it likes."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}.", suffix=TMP_SUFFIX,
                               dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def atomic_write(path: str | Path, data: bytes | str) -> None:
    """Write `data` (bytes, or text as UTF-8) to `path` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data if isinstance(data, bytes) else data.encode("utf-8"))


def _writer_pid(p: Path) -> int | None:
    """The pid in `.NAME.PID.RANDOM.tmp` (None for names of older versions)."""
    parts = p.name[: -len(TMP_SUFFIX)].rsplit(".", 2)
    return int(parts[1]) if len(parts) == 3 and parts[1].isdigit() else None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists, owned by someone else
        return True
    return True


def leftovers(directory: str | Path, stale_seconds: float = STALE_SECONDS) -> list[Path]:
    """Temporary files of interrupted atomic writes under `directory` (recursively): those whose
    writer process is gone, or (names without a pid) untouched for `stale_seconds`. A file
    being written right now by a live process is never listed."""
    d = Path(directory)
    if not d.is_dir():
        return []
    now = time.time()
    found = []
    for p in d.rglob(f".*{TMP_SUFFIX}"):
        try:
            if not p.is_file():
                continue
            pid = _writer_pid(p)
            if pid == os.getpid():
                continue
            if (pid is not None and not _alive(pid)) or now - p.stat().st_mtime > stale_seconds:
                found.append(p)
        except OSError:  # vanished meanwhile: its writer finished
            continue
    return found


def check_writable(path: str | Path, what: str = "output") -> None:
    """Fail with one line, before any work, if `path` cannot be written as a file: it is a
    directory, a parent is a file, or the file or its nearest existing folder is read-only.
    Missing parent folders are fine (writers create them)."""
    p = Path(path).expanduser()
    if p.is_dir():
        raise BatchlabError(f"{what} {p} is a directory; give a file name")
    if p.exists():
        if not os.access(p, os.W_OK):
            raise BatchlabError(f"{what} {p} is read-only")
        return
    anc = p.parent
    while not anc.exists() and anc != anc.parent:
        anc = anc.parent
    if not anc.is_dir():
        raise BatchlabError(f"{what} {p} cannot be created: {anc} is a file, not a folder")
    if not os.access(anc, os.W_OK | os.X_OK):
        raise BatchlabError(f"{what} {p} cannot be created: folder {anc} is read-only")


def check_writable_dir(path: str | Path, what: str = "output folder") -> None:
    """Like `check_writable`, for a folder that will be created if missing."""
    p = Path(path).expanduser()
    if p.exists() and not p.is_dir():
        raise BatchlabError(f"{what} {p} is a file, not a folder")
    anc = p
    while not anc.exists() and anc != anc.parent:
        anc = anc.parent
    if not anc.is_dir():
        raise BatchlabError(f"{what} {p} cannot be created: {anc} is a file, not a folder")
    if not os.access(anc, os.W_OK | os.X_OK):
        raise BatchlabError(f"{what} {p} is read-only" if anc == p
                            else f"{what} {p} cannot be created: folder {anc} is read-only")
