"""The second built-in datasets. CIFAR-10 from its binary archive: a small archive of the real
format (label byte + 3072 pixel bytes per record, five training files and a test file under
cifar-10-batches-bin/) built here and served from a file:// mirror, so nothing needs the
network. Fashion-MNIST from where Debian's dataset-fashion-mnist package installs it."""

from __future__ import annotations

import hashlib
import io
import tarfile
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from batchlab.atomic import leftovers
from batchlab.data import cifar, load_dataset, prepare, sources
from batchlab.errors import DataError

PER_FILE = 12


def _records(seed: int, n: int) -> tuple[bytes, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = np.arange(n) % 10
    x = rng.integers(0, 256, size=(n, 3, 32, 32), dtype=np.uint8)
    recs = np.concatenate([y[:, None].astype(np.uint8), x.reshape(n, -1)], axis=1)
    return recs.tobytes(), x, y


def _members(corrupt: str | None = None) -> tuple[dict[str, bytes], np.ndarray, np.ndarray]:
    spec = cifar.CIFAR10
    parts, xs, ys = {}, [], []
    for i, m in enumerate((*spec.train_members, *spec.test_members)):
        raw, x, y = _records(i, PER_FILE)
        parts[m] = raw[:-5] if m == corrupt else raw
        xs.append(x)
        ys.append(y)
    return parts, np.concatenate(xs), np.concatenate(ys)


def _archive(path: Path, parts: dict[str, bytes]) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w:gz") as tf:
        for name, data in [*parts.items(), ("batches.meta.txt", b"airplane\n")]:
            info = tarfile.TarInfo(f"cifar-10-batches-bin/{name}")
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def mirror(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    parts, x, y = _members()
    d = tmp_path / "mirror"
    sha = _archive(d / cifar.CIFAR10.archive, parts)
    spec = replace(cifar.CIFAR10, mirrors=(d.as_uri() + "/",), sha256=sha)
    monkeypatch.setitem(cifar.ARCHIVES, "cifar10", spec)
    monkeypatch.setattr("batchlab.data._CACHE", {})
    cache = tmp_path / "cache"
    monkeypatch.setenv("BATCHLAB_DATA", str(cache))
    return spec, cache, x, y


def test_download_verifies_then_loads_in_channel_height_width_order(mirror, tmp_path, monkeypatch):
    spec, cache, x, y = mirror
    raw = load_dataset("cifar10")
    n_train = 5 * PER_FILE
    assert raw.x_train.shape == (n_train, 3072) and raw.x_test.shape == (PER_FILE, 3072)
    assert raw.image_shape == (3, 32, 32) and raw.x_train.dtype == np.uint8
    assert np.array_equal(raw.x_train.reshape(-1, 3, 32, 32), x[:n_train])
    assert np.array_equal(raw.y_test, y[n_train:])
    assert (cache / "cifar10" / spec.archive).is_file() and not leftovers(cache)
    # offline now: the mirror is gone, the cache serves the same data
    monkeypatch.setitem(cifar.ARCHIVES, "cifar10",
                        replace(spec, mirrors=((tmp_path / "gone").as_uri() + "/",)))
    monkeypatch.setattr("batchlab.data._CACHE", {})
    assert load_dataset("cifar10").fingerprint == raw.fingerprint
    td = prepare(raw)
    assert td.input_shape == (3, 32, 32) and td.input_dim == 3072
    assert float(td.x_train.max()) <= 1.0


def test_wrong_checksum_leaves_no_file(mirror, monkeypatch):
    spec, cache, _, _ = mirror
    monkeypatch.setitem(cifar.ARCHIVES, "cifar10", replace(spec, sha256="0" * 64))
    with pytest.raises(DataError, match="checksum mismatch"):
        load_dataset("cifar10")
    assert not (cache / "cifar10" / spec.archive).exists() and not leftovers(cache)


def test_corrupt_cached_archive_says_delete_it(mirror):
    spec, cache, _, _ = mirror
    load_dataset("cifar10")
    path = cache / "cifar10" / spec.archive
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(DataError, match="delete it"):
        cifar.load_archive_dataset("cifar10")


def test_offline_without_data_says_how_to_provide_it(mirror, tmp_path, monkeypatch):
    spec, _, _, _ = mirror
    monkeypatch.setitem(cifar.ARCHIVES, "cifar10",
                        replace(spec, mirrors=((tmp_path / "nowhere").as_uri() + "/",)))
    with pytest.raises(DataError, match="--data-dir") as e:
        load_dataset("cifar10")
    assert "offline" in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(DataError, match="not cached"):
        cifar.load_archive_dataset("cifar10", download_ok=False)


def test_data_dir_with_archive_or_extracted_files(tmp_path):
    parts, x, _ = _members()
    _archive(tmp_path / "a" / cifar.CIFAR10.archive, parts)
    from_archive = load_dataset("cifar10", tmp_path / "a")
    d = tmp_path / "b" / "cifar-10-batches-bin"
    d.mkdir(parents=True)
    for name, data in parts.items():
        (d / name).write_bytes(data)
    from_dir = load_dataset("cifar10", tmp_path / "b")
    assert from_dir.fingerprint == from_archive.fingerprint
    assert np.array_equal(from_dir.x_test.reshape(-1, 3, 32, 32), x[-PER_FILE:])
    with pytest.raises(DataError, match="neither"):
        load_dataset("cifar10", tmp_path)


@pytest.mark.parametrize("bad", ["truncated", "label"])
def test_malformed_records_name_the_file(tmp_path, bad):
    parts, _, _ = _members(corrupt="data_batch_3.bin" if bad == "truncated" else None)
    if bad == "label":
        b = bytearray(parts["test_batch.bin"])
        b[0] = 10
        parts["test_batch.bin"] = bytes(b)
    _archive(tmp_path / cifar.CIFAR10.archive, parts)
    name = "data_batch_3.bin" if bad == "truncated" else "test_batch.bin"
    with pytest.raises(DataError, match=name):
        load_dataset("cifar10", tmp_path)


def test_builtin_cnn_trains_on_cifar_shaped_data(tmp_path):
    from batchlab.config import make_config
    from batchlab.engine.train import train

    parts, _, _ = _members()
    _archive(tmp_path / cifar.CIFAR10.archive, parts)
    res = train(make_config(dataset="cifar10", data_dir=str(tmp_path), model="cnn", epochs=1,
                            batch_size=20, lr=0.01, probes=[]))
    assert res.status == "completed"
    assert res.model(torch.zeros(1, 3072)).shape == (1, 10)


# -- Fashion-MNIST where Debian's dataset-fashion-mnist installs it ---------------------------
def _idx(a: np.ndarray) -> bytes:
    return bytes([0, 0, 8, a.ndim]) + b"".join(int(n).to_bytes(4, "big") for n in a.shape) + a.tobytes()


def test_fashion_mnist_is_found_in_the_system_dir(tmp_path, monkeypatch):
    import gzip

    d = tmp_path / "usr-share-datasets-fashion-mnist"
    d.mkdir()
    rng = np.random.default_rng(0)
    arrays = {"train_x": rng.integers(0, 256, (20, 28, 28), dtype=np.uint8),
              "train_y": (np.arange(20) % 10).astype(np.uint8),
              "test_x": rng.integers(0, 256, (10, 28, 28), dtype=np.uint8),
              "test_y": (np.arange(10) % 10).astype(np.uint8)}
    sums = {}
    for key, fname in sources.FILES.items():
        raw = _idx(arrays[key])
        (d / fname).write_bytes(gzip.compress(raw))  # a re-compression, as Debian ships it
        sums[fname] = hashlib.sha256(raw).hexdigest()
    spec = replace(sources.FASHION_MNIST, mirrors=((tmp_path / "offline").as_uri() + "/",),
                   raw_sha256=sums, system_dirs=(str(d),))
    monkeypatch.setitem(sources.REMOTE, "fashion-mnist", spec)
    monkeypatch.setattr("batchlab.data._CACHE", {})
    raw = load_dataset("fashion-mnist", download=False)
    assert raw.source == str(d) and raw.x_train.shape == (20, 784)
    assert np.array_equal(raw.y_test, arrays["test_y"])


@pytest.mark.skipif(not Path(sources.FASHION_MNIST.system_dirs[0]).is_dir(),
                    reason="Debian's dataset-fashion-mnist is not installed")
def test_installed_debian_fashion_mnist_passes_the_official_checksums(monkeypatch):
    monkeypatch.setattr("batchlab.data._CACHE", {})
    raw = load_dataset("fashion-mnist", download=False)
    assert raw.x_train.shape == (60000, 784) and raw.x_test.shape == (10000, 784)
    assert sorted(np.unique(raw.y_train)) == list(range(10))
