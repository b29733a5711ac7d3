"""Datasets: IDX validation, checksummed atomic downloads (served from local file:// mirrors),
offline errors, and the prepare() step (scaling, seeded validation split)."""

from __future__ import annotations

import gzip
import hashlib
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from batchlab import atomic
from batchlab.data import idx, load_dataset, prepare, sources
from batchlab.data.idx import parse_idx, read_idx, write_idx
from batchlab.errors import DataError

# -- IDX parsing ------------------------------------------------------------------------------


def _images(n: int = 6, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(n, 28, 28), dtype=np.uint8)


@pytest.mark.parametrize("name", ["x-idx3-ubyte", "x-idx3-ubyte.gz"])
def test_idx_round_trip_raw_and_gz(tmp_path: Path, name: str) -> None:
    arr = _images()
    write_idx(tmp_path / name, arr)
    back = read_idx(tmp_path / name)
    assert back.dtype == np.uint8 and back.shape == (6, 28, 28)
    np.testing.assert_array_equal(back, arr)


def test_idx_multibyte_dtype_round_trip(tmp_path: Path) -> None:
    arr = np.arange(12, dtype=np.int32).reshape(3, 4) - 5
    write_idx(tmp_path / "a.idx", arr)
    np.testing.assert_array_equal(read_idx(tmp_path / "a.idx"), arr)


def test_truncated_raw_file_is_an_error_naming_it(tmp_path: Path) -> None:
    path = tmp_path / "train-images-idx3-ubyte"
    write_idx(path, _images())
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(DataError, match="truncated") as e:
        read_idx(path)
    assert str(path) in str(e.value)


def test_truncated_gzip_is_an_error_naming_it(tmp_path: Path) -> None:
    path = tmp_path / "train-images-idx3-ubyte.gz"
    write_idx(path, _images())
    path.write_bytes(path.read_bytes()[:-40])
    with pytest.raises(DataError) as e:
        read_idx(path)
    assert str(path) in str(e.value)


def test_corrupt_gzip_is_an_error_naming_it(tmp_path: Path) -> None:
    path = tmp_path / "t10k-labels-idx1-ubyte.gz"
    path.write_bytes(b"\x1f\x8b\x08\x00" + b"definitely not deflate data" * 4)
    with pytest.raises(DataError, match="not a valid gzip") as e:
        read_idx(path)
    assert str(path) in str(e.value)


def test_bad_magic_is_an_error_naming_it(tmp_path: Path) -> None:
    path = tmp_path / "bad-magic"
    write_idx(path, _images())
    data = bytearray(path.read_bytes())
    data[0] = 0x42
    path.write_bytes(bytes(data))
    with pytest.raises(DataError, match="magic") as e:
        read_idx(path)
    assert str(path) in str(e.value)


def test_unknown_dtype_code_is_an_error(tmp_path: Path) -> None:
    data = bytes([0, 0, 0x07, 1]) + (3).to_bytes(4, "big") + b"abc"
    with pytest.raises(DataError, match="type code"):
        parse_idx(data, name="weird")


def test_trailing_bytes_are_an_error_naming_the_file(tmp_path: Path) -> None:
    path = tmp_path / "labels-idx1-ubyte.gz"
    labels = np.arange(10, dtype=np.uint8)
    payload = gzip.decompress(_gz_idx(labels)) + b"\x00\x01"
    path.write_bytes(gzip.compress(payload))
    with pytest.raises(DataError, match="trailing bytes") as e:
        read_idx(path)
    assert str(path) in str(e.value)


def test_missing_file_is_a_data_error(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="cannot read"):
        read_idx(tmp_path / "nope.gz")


@settings(max_examples=40, deadline=None)
@given(
    shape=st.lists(st.integers(1, 5), min_size=1, max_size=3),
    cut=st.integers(1, 200),
)
def test_any_truncation_is_detected(shape: list[int], cut: int) -> None:
    """Whatever prefix is lost, parsing fails loudly rather than returning a short array."""
    arr = np.zeros(shape, dtype=np.uint8)
    header = bytes([0, 0, 0x08, len(shape)]) + b"".join(d.to_bytes(4, "big") for d in shape)
    data = header + arr.tobytes()
    assert parse_idx(data).shape == tuple(shape)
    truncated = data[: max(0, len(data) - cut)]
    with pytest.raises(DataError):
        parse_idx(truncated, name="f")


# -- a tiny synthetic "MNIST" in IDX form ---------------------------------------------------


def _gz_idx(arr: np.ndarray) -> bytes:
    header = bytes([0, 0, 0x08, arr.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in arr.shape)
    return gzip.compress(header + np.ascontiguousarray(arr).tobytes(), mtime=0)


def _write_fake_mnist(directory: Path, n_train: int = 50, n_test: int = 20, seed: int = 0,
                      n_train_labels: int | None = None) -> dict[str, Path]:
    rng = np.random.default_rng(seed)
    directory.mkdir(parents=True, exist_ok=True)
    arrays = {
        "train_x": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "train_y": rng.integers(0, 10, n_train_labels or n_train, dtype=np.uint8),
        "test_x": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "test_y": rng.integers(0, 10, n_test, dtype=np.uint8),
    }
    paths = {}
    for key, fname in sources.FILES.items():
        paths[key] = directory / fname
        paths[key].write_bytes(_gz_idx(arrays[key]))
    return paths


def _spec_for(mirror_dir: Path, good_dir: Path) -> sources.RemoteSpec:
    """An MNIST-like spec whose mirror is a local directory and whose checksums are those of
    the files in `good_dir`."""
    sums = {f: hashlib.sha256((good_dir / f).read_bytes()).hexdigest() for f in sources.FILES.values()}
    return replace(sources.MNIST, mirrors=(mirror_dir.as_uri() + "/",), gz_sha256=sums,
                   raw_sha256={}, system_dirs=())


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    root = tmp_path / "cache"
    monkeypatch.setenv("BATCHLAB_DATA", str(root))
    return root


def test_user_data_dir_loads_and_count_mismatch_names_files(tmp_path: Path) -> None:
    good = tmp_path / "good"
    _write_fake_mnist(good)
    raw = sources.load_remote("mnist", good)
    assert raw.x_train.shape == (50, 784) and raw.x_test.shape == (20, 784)
    assert raw.x_train.dtype == np.uint8 and raw.y_train.dtype == np.int64

    bad = tmp_path / "bad"
    paths = _write_fake_mnist(bad, n_train_labels=49)
    with pytest.raises(DataError) as e:
        sources.load_remote("mnist", bad)
    msg = str(e.value)
    assert str(paths["train_x"]) in msg and str(paths["train_y"]) in msg
    assert "50" in msg and "49" in msg


def test_data_dir_accepts_raw_idx_files(tmp_path: Path) -> None:
    d = tmp_path / "raw"
    _write_fake_mnist(d)
    for f in list(d.iterdir()):
        (d / f.name.removesuffix(".gz")).write_bytes(gzip.decompress(f.read_bytes()))
        f.unlink()
    raw = sources.load_remote("mnist", d)
    assert len(raw.y_train) == 50


def test_data_dir_missing_files_is_one_clear_error(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="missing IDX files"):
        sources.load_remote("mnist", tmp_path)


def test_download_verifies_checksums_and_then_works_offline(
    tmp_path: Path, cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    mirror = tmp_path / "mirror"
    _write_fake_mnist(mirror)
    spec = _spec_for(mirror, mirror)
    monkeypatch.setitem(sources.REMOTE, "mnist", spec)
    raw = sources.load_remote("mnist")
    assert raw.x_train.shape == (50, 784)
    cached = sorted(p.name for p in (cache / "mnist").iterdir())
    assert cached == sorted(sources.FILES.values())  # the four files, no temp leftovers

    # offline now: the mirror is gone, the cache serves the data
    monkeypatch.setitem(sources.REMOTE, "mnist",
                        replace(spec, mirrors=((tmp_path / "gone").as_uri() + "/",)))
    again = sources.load_remote("mnist")
    np.testing.assert_array_equal(again.x_train, raw.x_train)
    assert again.fingerprint == raw.fingerprint

    # a cached file that no longer matches its checksum is refused, naming it
    victim = cache / "mnist" / sources.FILES["test_y"]
    victim.write_bytes(_gz_idx(np.zeros(20, dtype=np.uint8)))
    with pytest.raises(DataError, match="checksum mismatch") as e:
        sources.load_remote("mnist")
    assert str(victim) in str(e.value)


def test_download_with_wrong_checksum_leaves_no_file(
    tmp_path: Path, cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    official = tmp_path / "official"
    _write_fake_mnist(official, seed=0)
    tampered = tmp_path / "tampered"
    _write_fake_mnist(tampered, seed=1)  # valid IDX files, wrong bytes
    monkeypatch.setitem(sources.REMOTE, "mnist", _spec_for(tampered, official))
    with pytest.raises(DataError, match="checksum mismatch"):
        sources.load_remote("mnist")
    leftovers = list((cache / "mnist").iterdir()) if (cache / "mnist").exists() else []
    assert leftovers == []


def test_interrupted_download_leaves_no_half_file(
    tmp_path: Path, cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    official = tmp_path / "official"
    _write_fake_mnist(official)
    half = tmp_path / "half"
    half.mkdir()
    for f in sources.FILES.values():  # what a dropped connection leaves: a prefix
        data = (official / f).read_bytes()
        (half / f).write_bytes(data[: len(data) // 2])
    monkeypatch.setitem(sources.REMOTE, "mnist", _spec_for(half, official))
    with pytest.raises(DataError, match="not valid gzip"):
        sources.load_remote("mnist")
    assert not (cache / "mnist").exists() or list((cache / "mnist").iterdir()) == []


def test_offline_without_data_says_how_to_provide_it(
    tmp_path: Path, cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    unreachable = replace(sources.MNIST, mirrors=((tmp_path / "no-such-mirror").as_uri() + "/",),
                          system_dirs=())
    monkeypatch.setitem(sources.REMOTE, "mnist", unreachable)
    monkeypatch.setattr("batchlab.data._CACHE", {})
    with pytest.raises(DataError) as e:
        load_dataset("mnist")
    msg = str(e.value)
    assert "--data-dir" in msg and "BATCHLAB_DATA" in msg
    assert "\n" not in msg
    with pytest.raises(DataError, match="--data-dir"):
        sources.load_remote("mnist", download=False)


def test_unknown_dataset() -> None:
    with pytest.raises(DataError, match="unknown dataset"):
        load_dataset("cifar")


# -- prepare ----------------------------------------------------------------------------------


def test_embedded_digits_and_prepare_scaling() -> None:
    raw = load_dataset("digits")
    assert raw.x_train.shape[1] == 64 and len(raw.y_test) == 360
    td = prepare(raw)
    assert td.x_train.dtype == torch.float32
    assert float(td.x_train.min()) >= 0.0 and float(td.x_train.max()) <= 1.0
    std = prepare(raw, normalize="standardize")
    assert abs(float(std.x_train.mean())) < 1e-4 and abs(float(std.x_train.std()) - 1) < 1e-3


def test_validation_split_is_seeded_and_disjoint() -> None:
    raw = load_dataset("digits")
    a = prepare(raw, val_fraction=0.2, split_seed=1)
    b = prepare(raw, val_fraction=0.2, split_seed=1)
    c = prepare(raw, val_fraction=0.2, split_seed=2)
    n = len(raw.y_train)
    n_val = len(a.eval_sets["val"][1])
    assert n_val == round(0.2 * n) and a.n_train == n - n_val
    assert torch.equal(a.eval_sets["val"][0], b.eval_sets["val"][0])
    assert not torch.equal(a.eval_sets["val"][0], c.eval_sets["val"][0])
    with pytest.raises(DataError):
        prepare(raw, val_fraction=1.0)


def test_sha256_helper(tmp_path: Path) -> None:
    p = tmp_path / "f"
    p.write_bytes(b"batchlab")
    assert atomic.sha256_file(p) == hashlib.sha256(b"batchlab").hexdigest()
    assert atomic.sha256_file(p, chunk=3) == hashlib.sha256(b"batchlab").hexdigest()  # chunked


# -- hostile IDX content and subsets ----------------------------------------------------------
@pytest.mark.parametrize("key, arr, needle", [
    ("train_x", np.full((50, 28, 28), np.nan, dtype=np.float32), "unsigned bytes"),
    ("train_x", np.full((50, 28, 28), 1e30, dtype=np.float64), "unsigned bytes"),
    ("train_x", np.zeros((50, 28, 28), dtype=np.int16), "unsigned bytes"),
    ("train_y", np.full(50, -1, dtype=np.int8), "out of range"),
    ("train_y", np.full(50, 10, dtype=np.uint8), "out of range"),
    ("test_y", np.full(20, 1.5, dtype=np.float32), "integers"),
    ("train_x", np.zeros((0, 28, 28), dtype=np.uint8), "no images"),
])
def test_hostile_idx_content_is_one_error_naming_the_file(
        tmp_path: Path, key: str, arr: np.ndarray, needle: str) -> None:
    paths = _write_fake_mnist(tmp_path)
    if len(arr) == 0:
        write_idx(paths["train_y"].with_suffix(".tmp.gz"), np.zeros(0, dtype=np.uint8))
        paths["train_y"].write_bytes(paths["train_y"].with_suffix(".tmp.gz").read_bytes())
    write_idx(paths[key], arr)
    with pytest.raises(DataError, match=needle) as e:
        sources.load_remote("mnist", tmp_path)
    assert str(paths[key]) in str(e.value) and "\n" not in str(e.value)


def test_a_gzip_bomb_is_refused_from_its_header_before_inflating(tmp_path: Path) -> None:
    """A header declaring 4 GB, followed by 8 MB of zeros (the gz is a few KB): refused by the
    header check, without inflating more than a few bytes."""
    bomb = tmp_path / "bomb-idx3-ubyte.gz"
    header = bytes([0, 0, 0x08, 3]) + b"".join(n.to_bytes(4, "big") for n in (1_000_000, 64, 64))
    with gzip.open(bomb, "wb") as f:
        f.write(header)
        for _ in range(8):
            f.write(bytes(1 << 20))
    assert bomb.stat().st_size < 100_000
    reads: list[int] = []
    real_open = gzip.open

    def counting_open(*a, **k):  # record how much is ever asked of the decompressor
        g = real_open(*a, **k)
        real_read = g.read
        g.read = lambda n=-1: reads.append(n) or real_read(n)
        return g

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(idx.gzip, "open", counting_open)
        with pytest.raises(DataError, match="declares 4,096,000,016 bytes"):
            read_idx(bomb)
    assert reads == [20]
    # under the limit, the same streaming read returns exactly the file
    small = tmp_path / "ok-idx3-ubyte.gz"
    write_idx(small, _images(3))
    assert np.array_equal(read_idx(small), _images(3))
    with pytest.raises(DataError, match="more than the 100"):
        idx.read_bytes(small, limit=100)


def test_max_train_is_a_stratified_subset_not_the_first_rows() -> None:
    from batchlab.data import stratified_subset
    from batchlab.data.sources import RawData

    y = np.repeat(np.arange(10), 500)  # class-sorted, like mnist-5k's file
    x = np.repeat(y[:, None], 4, axis=1).astype(np.uint8)
    raw = RawData(x, y, x[:1000], y[:1000], "t", "f", (2, 2))
    td = prepare(raw, max_train=600, max_test=100)
    assert np.bincount(td.y_train.numpy(), minlength=10).tolist() == [60] * 10
    assert np.bincount(td.eval_sets["test"][1].numpy()).tolist() == [50, 50]  # 0s and 1s
    skewed = np.array([0] * 900 + [1] * 100)
    assert np.bincount(skewed[stratified_subset(skewed, 50)]).tolist() == [45, 5]
    a, b = stratified_subset(y, 600), stratified_subset(y, 600)
    assert np.array_equal(a, b) and len(set(a.tolist())) == 600  # fixed: same data every run
    real = load_dataset("digits")
    td = prepare(real, max_train=200)
    assert len(np.unique(td.y_train.numpy())) == 10
