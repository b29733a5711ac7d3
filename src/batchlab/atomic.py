"""The one way batchlab writes a file: to a temporary name beside it, then `os.replace`.

A reader (or a crash at any instant) sees the old file or the new one, never half of one. The
temporary names share one pattern (`.NAME.PID.RANDOM.tmp`), so leftovers of a killed process can
be found and removed by `leftovers()`: the writer's pid in the name tells a live writer's file
(never touched) from a dead one's. `to_json` is the one encoder of every JSON document
batchlab writes: JSON has no NaN or infinity, so a non-finite float becomes null (a reader of
claims.json, recommend.json or a stored run record never meets the invalid token `NaN`).
`check_writable` tells, before any work starts, whether a path the user gave can be written
at all; `check_output` also refuses a path that is (or links to) a results store, its WAL/SHM
or its artifact folder, and an existing file unless forced.

Files get the mode a plain `open()` would give them (0666 less the user's umask): `mkstemp`
creates 0600, which made every report, CSV and checkpoint unreadable to the rest of a lab
sharing a folder or a store.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from batchlab.errors import BatchlabError

TMP_SUFFIX = ".tmp"
STALE_SECONDS = 600.0
"""A temporary file (or unclaimed artifact) untouched this long belongs to no live write."""


_UMASK_LOCK = threading.Lock()
SQLITE_MAGIC = b"SQLite format 3\x00"
STORE_SIDE_FILES = ("-wal", "-shm", "-journal")
ARTIFACTS_SUFFIX = ".artifacts"


def umask() -> int:
    """The process's umask: read from /proc where there is one (setting and restoring it, the
    only portable getter, briefly changes it for every thread of the process)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    with _UMASK_LOCK:
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


def file_mode() -> int:
    """The mode `open(path, "w")` gives a new file: 0666 less the umask."""
    return 0o666 & ~umask()


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on a clean exit it replaces `path`, on an
    exception it is deleted. The caller writes the temporary path however it likes; the file
    ends with the user's umask applied (not mkstemp's 0600)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}.", suffix=TMP_SUFFIX,
                               dir=path.parent)
    os.close(fd)
    try:  # a replaced file keeps its mode; a new one gets what open() would give it
        mode = path.stat().st_mode & 0o7777
    except OSError:
        mode = file_mode()
    os.chmod(tmp, mode)
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


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    """sha256 of a file's bytes, read in chunks (checkpoints and archives can be large): the one
    digest every stored artifact, cached download and measurement file is checked against."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def jsonable(v: Any, nonfinite: Callable[[float], Any] = lambda x: None) -> Any:
    """`v` as plain JSON values: numpy/torch scalars and arrays become Python numbers and lists,
    tuples lists, keys strings, and a non-finite float `nonfinite(x)` (None, i.e. null, unless
    a caller needs them told apart: the measurement cache keeps its tagged strings, which its
    row keys are hashed from)."""
    if hasattr(v, "tolist") and not isinstance(v, (str, bytes)):
        v = v.tolist()
    if isinstance(v, float):
        return v if math.isfinite(v) else nonfinite(v)
    if isinstance(v, Mapping):
        return {str(k): jsonable(x, nonfinite) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [jsonable(x, nonfinite) for x in v]
    return v


def to_json(v: Any, **kwargs: Any) -> str:
    """Strict JSON text of `v` (NaN and +-inf as null; `kwargs` go to `json.dumps`)."""
    return json.dumps(jsonable(v), allow_nan=False, **kwargs)


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


def _is_sqlite(p: Path) -> bool:
    try:
        with open(p, "rb") as f:
            return f.read(len(SQLITE_MAGIC)) == SQLITE_MAGIC
    except OSError:
        return False


def store_role(path: str | Path, stores: tuple[str | Path, ...] = ()) -> str | None:
    """What of a results store `path` is, after resolving symlinks and `..` (None: nothing):
    the store itself (any SQLite file, or one of `stores`), its WAL/SHM/journal, or a file in
    its artifact folder. Writing there would destroy stored results."""
    r = Path(path).expanduser().resolve()
    own = {Path(s).expanduser().resolve() for s in stores}
    if r in own:
        return f"the results store {r}"
    if r.is_file() and _is_sqlite(r):
        return f"an SQLite database (a results store?) {r}"
    for side in STORE_SIDE_FILES:
        base = r.with_name(r.name[: -len(side)]) if r.name.endswith(side) else None
        if base is not None and (base.is_file() or base in own):
            return f"the {side[1:].upper()} file of results store {base}"
    for anc in (r, *r.parents):
        if anc.name.endswith(ARTIFACTS_SUFFIX) and len(anc.name) > len(ARTIFACTS_SUFFIX):
            base = anc.with_name(anc.name[: -len(ARTIFACTS_SUFFIX)])
            if base.is_file() or base in own:
                return f"inside the artifact folder of results store {base}"
    return None


def check_output(path: str | Path, what: str = "--output", *, force: bool = False,
                 stores: tuple[str | Path, ...] = ()) -> None:
    """`check_writable`, and refuse (one line) an output path that is, or links to, a results
    store, its WAL/SHM or artifact folder (never overwritten, even with --force), or an existing
    file without `force`."""
    role = store_role(path, stores)
    if role is not None:
        raise BatchlabError(f"{what} {path} is {role}; writing there would destroy stored "
                            f"results: give another file name")
    p = Path(path).expanduser()
    check_writable(p, what)
    if p.exists() and not force:
        raise BatchlabError(f"{what} {p} already exists; pass --force to replace it, or give "
                            f"another file name")


def check_output_dir(path: str | Path, what: str, writes: tuple[str, ...],
                     stores: tuple[str | Path, ...] = ()) -> None:
    """For a folder batchlab writes `writes` (names of files or sub-folders) into: refuse a
    folder that is a store or lies in an artifact folder, and a store among what is written."""
    p = Path(path).expanduser()
    role = store_role(p, stores)
    if role is not None:
        raise BatchlabError(f"{what} {path} is {role}; give another folder")
    check_writable_dir(p, what)
    r = p.resolve()
    for s in stores:
        sr = Path(s).expanduser().resolve()
        art = sr.with_name(sr.name + ARTIFACTS_SUFFIX)
        for name in writes:
            target = r / name
            for victim in (sr, art):
                if victim == target or target in victim.parents:
                    raise BatchlabError(
                        f"{what} {path} would write {target}, where results store {sr} keeps "
                        f"{'its file' if victim == sr else 'its artifacts'}; give another folder")
