"""CIFAR-10 from its official binary archive (`cifar-10-binary.tar.gz`), never the pickled one.

The binary format: each `.bin` file is a run of fixed-length records, 1 label byte (0..9)
followed by 3072 pixel bytes (1024 red, 1024 green, 1024 blue, each 32x32 row-major), i.e. one
image in channel-height-width order. Five training files of 10,000 records and one test file.

Same behaviour as MNIST (`sources.load_remote`): a `--data-dir` the user supplies (holding the
archive or the extracted `.bin` files) is validated structurally; otherwise the archive is read
from the cache (sha256-checked), or downloaded into it (streamed to a temporary file, checked,
then renamed: never a half file), and offline without a cached copy is a one-line error that
says how to provide the data. Members are read straight out of the tar (no extraction to disk).
"""

from __future__ import annotations

import hashlib
import tarfile
import urllib.error
import urllib.request
from dataclasses import dataclass
from http.client import HTTPException
from pathlib import Path

import numpy as np

from batchlab.atomic import atomic_path, sha256_file
from batchlab.data.sources import RawData, cache_root
from batchlab.errors import DataError


@dataclass(frozen=True)
class ArchiveSpec:
    """A dataset published as one tar.gz of fixed-length binary records."""

    name: str
    archive: str
    mirrors: tuple[str, ...]
    sha256: str
    member_dir: str
    train_members: tuple[str, ...]
    test_members: tuple[str, ...]
    image_shape: tuple[int, int, int]
    n_classes: int = 10


CIFAR10 = ArchiveSpec(
    name="cifar10",
    archive="cifar-10-binary.tar.gz",
    mirrors=("https://www.cs.toronto.edu/~kriz/",),
    sha256="c4a38c50a1bc5f3a1c5537f2155ab9d68f9f25eb1ed8d9ddda3db29a59bca1dd",
    member_dir="cifar-10-batches-bin",
    train_members=tuple(f"data_batch_{i}.bin" for i in range(1, 6)),
    test_members=("test_batch.bin",),
    image_shape=(3, 32, 32),
)

ARCHIVES = {"cifar10": CIFAR10}


def parse_records(raw: bytes, spec: ArchiveSpec, name: str) -> tuple[np.ndarray, np.ndarray]:
    """(uint8 images [N, C*H*W], int64 labels) from one binary file; a short or malformed file
    is an error naming it."""
    size = 1 + int(np.prod(spec.image_shape))
    if not raw or len(raw) % size:
        raise DataError(f"{name}: {len(raw)} bytes is not a whole number of {size}-byte records "
                        f"(truncated or not a {spec.name} binary file)")
    a = np.frombuffer(raw, dtype=np.uint8).reshape(-1, size)
    y = a[:, 0].astype(np.int64)
    if int(y.max()) >= spec.n_classes:
        raise DataError(f"{name}: label {int(y.max())} out of range 0..{spec.n_classes - 1}")
    return np.ascontiguousarray(a[:, 1:]), y


def _assemble(parts: dict[str, bytes], spec: ArchiveSpec, source: str) -> RawData:
    h = hashlib.sha256()
    arrays = {}
    for member in (*spec.train_members, *spec.test_members):
        h.update(hashlib.sha256(parts[member]).digest())
        arrays[member] = parse_records(parts[member], spec, f"{source}:{member}")
    xtr = np.concatenate([arrays[m][0] for m in spec.train_members])
    ytr = np.concatenate([arrays[m][1] for m in spec.train_members])
    xte = np.concatenate([arrays[m][0] for m in spec.test_members])
    yte = np.concatenate([arrays[m][1] for m in spec.test_members])
    return RawData(xtr, ytr, xte, yte, source, h.hexdigest(), spec.image_shape, spec.n_classes)


def read_archive(path: Path, spec: ArchiveSpec) -> RawData:
    """The dataset from the tar.gz at `path`, members read in memory."""
    parts: dict[str, bytes] = {}
    try:
        with tarfile.open(path, "r:gz") as tf:
            for member in (*spec.train_members, *spec.test_members):
                try:
                    info = tf.getmember(f"{spec.member_dir}/{member}")
                except KeyError:
                    raise DataError(f"{path} has no {spec.member_dir}/{member}: not the "
                                    f"{spec.name} binary archive") from None
                f = tf.extractfile(info) if info.isfile() else None
                if f is None:
                    raise DataError(f"{path}: {spec.member_dir}/{member} is not a regular file")
                parts[member] = f.read()
    except (tarfile.TarError, OSError, EOFError) as e:
        raise DataError(f"{path} is not a readable tar.gz (truncated or corrupt): {e}") from None
    return _assemble(parts, spec, str(path))


def read_directory(directory: Path, spec: ArchiveSpec) -> RawData | None:
    """The extracted `.bin` files in `directory` (or its `member_dir`); None if any is missing."""
    for d in (directory, directory / spec.member_dir):
        files = {m: d / m for m in (*spec.train_members, *spec.test_members)}
        if all(p.is_file() for p in files.values()):
            try:
                parts = {m: p.read_bytes() for m, p in files.items()}
            except OSError as e:
                raise DataError(f"cannot read {d}: {e.strerror}") from None
            return _assemble(parts, spec, str(d))
    return None


def download(url: str, dest: Path, sha256: str, timeout: float = 30.0) -> None:
    """Stream `url` to a temporary file beside `dest`, check its sha256, then rename."""
    with atomic_path(dest) as tmp:
        h = hashlib.sha256()
        with open(tmp, "wb") as out, urllib.request.urlopen(url, timeout=timeout) as resp:
            while chunk := resp.read(1 << 20):
                h.update(chunk)
                out.write(chunk)
        if h.hexdigest() != sha256:
            raise DataError(f"checksum mismatch for {dest.name} downloaded from {url}")


def load_archive_dataset(name: str, data_dir: str | Path | None = None,
                         download_ok: bool = True) -> RawData:
    """CIFAR-10: from `data_dir` if given, else the cache, else a download into the cache."""
    spec = ARCHIVES[name]
    if data_dir is not None:
        d = Path(data_dir).expanduser()
        if (d / spec.archive).is_file():
            return read_archive(d / spec.archive, spec)
        raw = read_directory(d, spec)
        if raw is None:
            raise DataError(f"--data-dir {d}: neither {spec.archive} nor the extracted "
                            f"{spec.member_dir}/*.bin files are there")
        return raw
    dest = cache_root() / name / spec.archive
    if dest.is_file():
        if sha256_file(dest) != spec.sha256:
            raise DataError(f"checksum mismatch for {dest}: the file is corrupt or not the official "
                            f"{spec.archive}; delete it to download again")
        return read_archive(dest, spec)
    if not download_ok:
        raise DataError(f"{name} is not cached in {dest.parent}; pass --data-dir or allow download")
    errors = []
    for mirror in spec.mirrors:
        try:
            download(mirror + spec.archive, dest, spec.sha256)
            break
        except (urllib.error.URLError, OSError, TimeoutError, HTTPException) as e:
            errors.append(f"{mirror}: {getattr(e, 'reason', e)}")
    else:
        raise DataError(f"cannot download {name} ({errors[-1] if errors else 'no mirror'}); offline? "
                        f"put {spec.archive} (or its extracted .bin files) in a directory and pass "
                        f"--data-dir DIR, or set BATCHLAB_DATA to a cache holding {name}/{spec.archive}")
    return read_archive(dest, spec)
