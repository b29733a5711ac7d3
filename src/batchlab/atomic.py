"""The one way batchlab writes a file: to a temporary name beside it, then `os.replace`.

A reader (or a crash at any instant) sees the old file or the new one, never half of one. The
temporary names share one pattern (`.NAME.*.tmp`), so leftovers of a killed process can be
found and removed by `leftovers()`.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

TMP_SUFFIX = ".tmp"


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on a clean exit it replaces `path`, on an
    exception it is deleted. The caller writes the temporary path however it likes."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TMP_SUFFIX, dir=path.parent)
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


def leftovers(directory: str | Path) -> list[Path]:
    """Temporary files of interrupted atomic writes under `directory` (recursively)."""
    d = Path(directory)
    if not d.is_dir():
        return []
    return [p for p in d.rglob(f".*{TMP_SUFFIX}") if p.is_file()]
