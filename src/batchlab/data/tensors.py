"""A user's tensors as a dataset: `--data module:loader` through the same `prepare` path as the
built-in datasets (resident on the device, seeded validation split, max_train/max_test).

The loader returns `(X, y)` or `(X_train, y_train, X_test, y_test)` (see `batchlab.usercode`).
With `(X, y)` only, a test part is split off: 10% (at most 5,000), chosen by a seeded
permutation. That split defines the dataset (fixed seed 0 for config runs, like the embedded
datasets' splits), so it is not part of a run's randomness. X keeps the loader's per-example
shape (a CNN gets [N, C, H, W]); the fingerprint covers the tensors' dtype, shape and bytes and
the split rule, so the store key changes exactly when the data do.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from batchlab.data.sources import RawData
from batchlab.data.stream import StreamData, is_source
from batchlab.errors import DataError
from batchlab.usercode import fingerprint_tensors, load_object, user_data, user_output

_USER_CACHE: dict[tuple[str, int], RawData] = {}


def split_test(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(train indices, test indices), both sorted: a seeded 10% (at most 5,000) held out."""
    n_test = min(5000, max(1, n // 10))
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return perm[n_test:].sort().values, perm[:n_test].sort().values


def raw_from_tensors(*tensors: torch.Tensor, split_seed: int = 0, n_classes: int | None = None,
                     source: str = "tensors", classification: bool = True) -> RawData:
    """RawData from validated `(X, y)` or `(X_train, y_train, X_test, y_test)` CPU tensors.
    X stays float32 or int64 (integer inputs such as token ids are not cast); y is int64 class
    labels for classification and keeps its dtype otherwise (`n_classes` then 0)."""
    if len(tensors) == 2:
        x, y = tensors
        tr, te = split_test(len(y), split_seed)
        parts = (x[tr], y[tr], x[te], y[te])
        fp = fingerprint_tensors(x, y) + f":split10%:{split_seed}"
    elif len(tensors) == 4:
        parts = tensors
        fp = fingerprint_tensors(*tensors)
    else:
        raise DataError("data must be (X, y) or (X_train, y_train, X_test, y_test)")
    if classification:
        c = n_classes if n_classes is not None else int(max(int(parts[1].max()), int(parts[3].max()))) + 1
    else:
        c = 0
        fp += ":targets"  # the same tensors under another loss are other data
    xtr, ytr, xte, yte = (t.detach().cpu().numpy() for t in parts)

    def xs(a: np.ndarray) -> np.ndarray:
        return a.astype(np.int64 if np.issubdtype(a.dtype, np.integer) else np.float32, copy=False)

    def ys(a: np.ndarray) -> np.ndarray:
        return a.astype(np.int64) if classification else a

    return RawData(x_train=xs(xtr), y_train=ys(ytr), x_test=xs(xte), y_test=ys(yte),
                   source=source, fingerprint=hashlib.sha256(fp.encode()).hexdigest(),
                   image_shape=tuple(xtr.shape[1:]), n_classes=c)


def flatten(raw: RawData, builtin: bool = False) -> RawData:
    """The same data with each example flattened to a vector (for the built-in MLP); `builtin`:
    integer inputs become float32 (the built-in models take real-valued features)."""
    if builtin and np.issubdtype(raw.x_train.dtype, np.integer):
        raw = RawData(raw.x_train.astype(np.float32), raw.y_train, raw.x_test.astype(np.float32),
                      raw.y_test, raw.source, raw.fingerprint, raw.image_shape, raw.n_classes)
    if raw.x_train.ndim == 2:
        return raw
    return RawData(raw.x_train.reshape(len(raw.x_train), -1), raw.y_train,
                   raw.x_test.reshape(len(raw.x_test), -1), raw.y_test, raw.source,
                   raw.fingerprint, raw.image_shape, raw.n_classes)


def load_user(spec: str, flat: bool = False, objective: Any = None, *, builtin: bool = False,
              max_train: int | None = None, max_test: int | None = None) -> RawData | StreamData:
    """The loader's data (memoized per loader function and objective: a sweep calls the loader
    once): tensors as RawData (`flat`: each example flattened to a vector, for the built-in MLP;
    `builtin`: integer inputs as float32), any other source as `StreamData` (opened once, its
    fingerprint read off a bounded prefix; `max_train`/`max_test` keep the first examples)."""
    from batchlab.task import Data, objective_for

    obj = objective if objective is not None else objective_for(None)
    fn: Any = load_object(spec, "data")
    key = (spec, id(fn), obj.name, max_train, max_test)
    if key not in _USER_CACHE:
        if len(_USER_CACHE) > 4:
            _USER_CACHE.clear()
        out = user_output(spec)
        if isinstance(out, Data) and isinstance(out.train, (tuple, list)):
            out = (*out.train, *(out.test or ()))
        if isinstance(out, Data) or is_source(out):
            d = out if isinstance(out, Data) else Data(train=out)
            _USER_CACHE[key] = StreamData(d.train, d.test, identity=d.identity or spec,
                                          n_classes=d.n_classes, max_train=max_train,
                                          max_test=max_test, classification=obj.accuracy)
        else:
            _USER_CACHE[key] = raw_from_tensors(*user_data(spec, obj, out), source=spec,
                                                classification=obj.accuracy)
    got = _USER_CACHE[key]
    if isinstance(got, StreamData):
        return got
    return flatten(got, builtin) if flat else _float_for_builtin(got, builtin)


def _float_for_builtin(raw: RawData, builtin: bool) -> RawData:
    if not builtin or not np.issubdtype(raw.x_train.dtype, np.integer):
        return raw
    return RawData(raw.x_train.astype(np.float32), raw.y_train, raw.x_test.astype(np.float32),
                   raw.y_test, raw.source, raw.fingerprint, raw.image_shape, raw.n_classes)


def tensor_data(x: torch.Tensor, y: torch.Tensor, n_classes: int, device: torch.device,
                seed: int = 0, test: Sequence[torch.Tensor] = ()) -> Any:
    """Resident TensorData from (X, y) and `test` = (X_test, y_test), or without a test part a
    seeded 10% (at most 5000) held out as the test set."""
    from batchlab.data import prepare

    parts = [t.detach().cpu() for t in (x, y, *test)]
    raw = raw_from_tensors(*parts, split_seed=seed, n_classes=n_classes)
    return prepare(raw, device=device)
