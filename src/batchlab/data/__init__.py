"""Datasets as in-memory tensors: uint8 on the host, float32 on the training device.

`load_dataset(name, data_dir)` gives the raw uint8 arrays; `prepare(...)` scales them
([0, 1] like the reproduced study, or standardized; a user's integer inputs, e.g. token ids,
are left as they are), optionally carves a seeded validation
split out of the training set, and moves them to the device once, so the training loop only
ever indexes resident tensors.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from batchlab.data.sources import RawData, load_digits, load_mnist_5k, load_remote
from batchlab.errors import DataError

if TYPE_CHECKING:
    from batchlab.config import TrainConfig

DATASETS = ("mnist", "fashion-mnist", "cifar10", "mnist-5k", "digits")
DEFAULT_DATASET = "mnist-5k"

_CACHE: dict[tuple, RawData] = {}


def load_dataset(name: str, data_dir: str | Path | None = None, download: bool = True) -> RawData:
    """Raw uint8 data for a named dataset (memoized per process: sweeps load it once)."""
    if name not in DATASETS:
        raise DataError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
    try:
        key = (name, str(Path(data_dir).expanduser().resolve()) if data_dir else None)
    except (RuntimeError, OSError):  # RuntimeError: Python's "Symlink loop"
        raise DataError(f"--data-dir {data_dir} cannot be resolved (a symlink loop?)") from None
    if key not in _CACHE:
        if name in ("mnist", "fashion-mnist"):
            _CACHE[key] = load_remote(name, data_dir, download=download)
        elif name == "cifar10":
            from batchlab.data.cifar import load_archive_dataset

            _CACHE[key] = load_archive_dataset(name, data_dir, download_ok=download)
        elif name == "mnist-5k":
            _CACHE[key] = load_mnist_5k()
        else:
            _CACHE[key] = load_digits()
    return _CACHE[key]


def stratified_subset(y: np.ndarray, n: int, seed: int = 0) -> np.ndarray:
    """Sorted indices of `n` rows whose class mix matches the whole set's (each class gets its
    share, up to rounding), chosen at random with a fixed seed: the subset is part of the data
    set's definition, the same for every run and seed.

    How: shuffle once; rank each row within its class in shuffled order; a row of a class with
    c members at rank r sits at quantile (r + 0.5) / c; take the n lowest quantiles."""
    if n >= len(y):
        return np.arange(len(y))
    perm = np.random.default_rng(seed).permutation(len(y))
    yp = np.asarray(y)[perm]
    _, inverse, counts = np.unique(yp, return_inverse=True, return_counts=True)
    order = np.argsort(inverse, kind="stable")
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    rank = np.empty(len(y), dtype=np.int64)
    rank[order] = np.arange(len(y)) - np.repeat(starts, counts)
    quantile = (rank + 0.5) / counts[inverse]
    return np.sort(perm[np.argsort(quantile, kind="stable")[:n]])


def subset(y: np.ndarray, n: int, seed: int = 0) -> np.ndarray:
    """Sorted indices of n rows: stratified for class labels (`stratified_subset`), a seeded
    random choice for other targets (real values, token sequences)."""
    if y.ndim == 1 and np.issubdtype(y.dtype, np.integer):
        return stratified_subset(y, n, seed)
    if n >= len(y):
        return np.arange(len(y))
    return np.sort(np.random.default_rng(seed).permutation(len(y))[:n])


@dataclass
class TensorData:
    """Float tensors resident on one device. `eval_sets` names what is evaluated each epoch.
    `input_shape` is one example's image shape (e.g. (28, 28), (3, 32, 32)) when known: the
    built-in CNN views flat rows in it."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    eval_sets: dict[str, tuple[torch.Tensor, torch.Tensor]]
    input_dim: int
    n_classes: int
    fingerprint: str
    input_shape: tuple[int, ...] | None = None

    @property
    def n_train(self) -> int:
        return int(self.x_train.shape[0])


_PREPARED: dict[tuple, TensorData] = {}


def prepare_for(raw: RawData, cfg: TrainConfig, device: torch.device) -> TensorData:
    """`prepare` with a run config's data options, memoized per process: a sweep, or a Ray
    worker across its tasks, prepares each variant once. The one place that maps a config
    onto `prepare`, so the tensors of a run are the same whichever executor prepares them
    (the Ray worker's own copy once left out `train_eval_size`)."""
    k = (raw.fingerprint, raw.x_train.shape[1:], str(raw.x_train.dtype), cfg.normalize,
         cfg.val_fraction, cfg.max_train, cfg.max_test, cfg.train_eval_size, str(device))
    if k not in _PREPARED:
        if len(_PREPARED) > 4:
            _PREPARED.clear()
        _PREPARED[k] = prepare(raw, normalize=cfg.normalize, val_fraction=cfg.val_fraction,
                               max_train=cfg.max_train, max_test=cfg.max_test,
                               train_eval_size=cfg.train_eval_size, device=device)
    return _PREPARED[k]


def prepare(
    raw: RawData,
    *,
    normalize: str = "unit",
    val_fraction: float = 0.0,
    split_seed: int = 0,
    max_train: int | None = None,
    max_test: int | None = None,
    train_eval_size: int | None = None,
    device: torch.device | str = "cpu",
) -> TensorData:
    """Scale, split and move to `device`.

    `normalize="unit"` divides uint8 images by 255 (the reproduction preset) and leaves float
    data (a user's loader) as given; "standardize" subtracts the
    training mean and divides by its std (one scalar each, computed on the training part only).
    `val_fraction` holds out a seeded random part of the training set as "val".
    `max_train` / `max_test` keep a stratified subset (`stratified_subset`), never the first
    rows: the files of some sets are sorted by class.
    `train_eval_size` scores the train metrics on a stratified subset of that many training
    rows (`TrainConfig.train_eval_size`); the model still trains on all of them. 0: the train
    set is not evaluated.
    """
    if normalize not in ("unit", "standardize"):
        raise DataError(f"unknown normalize {normalize!r}; use 'unit' or 'standardize'")
    if not 0.0 <= val_fraction < 1.0:
        raise DataError(f"val_fraction must be in [0, 1), got {val_fraction}")
    x_tr, y_tr = raw.x_train, raw.y_train
    x_te, y_te = raw.x_test, raw.y_test
    if max_train is not None and max_train < len(y_tr):
        keep = subset(y_tr, max_train)
        x_tr, y_tr = x_tr[keep], y_tr[keep]
    if max_test is not None and max_test < len(y_te):
        keep = subset(y_te, max_test)
        x_te, y_te = x_te[keep], y_te[keep]
    eval_np: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    if val_fraction > 0:
        rng = np.random.default_rng(split_seed)
        perm = rng.permutation(len(y_tr))
        n_val = max(1, int(round(val_fraction * len(y_tr))))
        val, tr = perm[:n_val], np.sort(perm[n_val:])
        eval_np["val"] = (x_tr[np.sort(val)], y_tr[np.sort(val)])
        x_tr, y_tr = x_tr[tr], y_tr[tr]
    eval_np = {"train": (x_tr, y_tr), "test": (x_te, y_te), **eval_np}

    dev = torch.device(device)
    if normalize == "unit" or x_tr.dtype == np.int64:
        mean, std = 0.0, (255.0 if x_tr.dtype == np.uint8 else 1.0)
    else:
        mean = float(x_tr.mean())
        std = float(x_tr.std()) or 1.0

    def to_t(x: np.ndarray, y: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        if x.dtype == np.int64:  # a user's integer inputs (token ids): used as they are
            xt = torch.from_numpy(np.ascontiguousarray(x)).to(dev)
        else:
            xt = torch.from_numpy(np.ascontiguousarray(x)).to(dev).float().sub_(mean).div_(std)
        return xt, torch.from_numpy(np.ascontiguousarray(y)).to(dev)

    evals = {k: to_t(*v) for k, v in eval_np.items()}
    x_train_t, y_train_t = evals["train"]
    if train_eval_size == 0:  # nothing reads the train metrics: not evaluated
        del evals["train"]
    elif train_eval_size is not None and train_eval_size < len(y_tr):
        keep = torch.from_numpy(subset(y_tr, train_eval_size)).to(dev)
        evals["train"] = (x_train_t[keep], y_train_t[keep])
    return TensorData(
        x_train=x_train_t,
        y_train=y_train_t,
        eval_sets=evals,
        input_dim=int(np.prod(x_train_t.shape[1:])),
        n_classes=raw.n_classes,
        fingerprint=raw.fingerprint,
        input_shape=tuple(raw.image_shape),
    )


__all__ = ["DATASETS", "DEFAULT_DATASET", "RawData", "TensorData", "load_dataset", "prepare",
           "stratified_subset"]
