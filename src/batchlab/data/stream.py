"""Data that stays where it is: a map-style Dataset, an IterableDataset or a loader factory,
batched by the engine one batch at a time (never materialised; see `batchlab.task.Data`).

Batching, per epoch:
- map-style `Dataset`: a permutation from the run's shuffle stream (as resident tensors get),
  cut into batches of indices, each collated from `ds[i]` (`default_collate`);
- `IterableDataset`: its own order (`set_epoch(epoch)` is called first when it has one),
  consecutive examples collated into batches; the last batch may be smaller;
- factory `(batch_size, seed) -> iterable of (x, y) batches`: called once per epoch with a seed
  drawn from the run's shuffle stream, its batches used as they come.
`max_train` / `max_test` keep the first examples of a stream (the start of its order).
Inputs keep their dtype (integer token ids stay integer); float64 becomes float32.

Evaluation each epoch: the test part in full, the training part on its first
`EVAL_TRAIN_EXAMPLES` examples (a full pass over a large stream every epoch would double the
cost of training; rows say how many with `train_eval_examples`).

Fingerprint (the data's part of the store key): sha256 over the kind of each part, the declared
`identity` (default: the loader's `module:function`), the length when known and the dtype,
shape and bytes of the first `PREFIX_EXAMPLES` examples of each part, read once when the source
is opened. What it guarantees: the key changes when the identity, a length or any prefix
example changes. An edit beyond the prefix that keeps identity and length is not seen, so give
data that change in place a versioned identity ("corpus-v2"). The stream is never read twice
for the key, and never read whole.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch.utils.data import Dataset, IterableDataset, TensorDataset, default_collate

from batchlab.errors import ConfigError, DataError

PREFIX_EXAMPLES = 256
EVAL_TRAIN_EXAMPLES = 8192
EVAL_BATCH = 1024

Batch = tuple[torch.Tensor, torch.Tensor]


def is_source(obj: Any) -> bool:
    """Whether `obj` is a non-tensor data source (Dataset, IterableDataset, factory)."""
    return isinstance(obj, (Dataset, IterableDataset)) or (
        callable(obj) and not isinstance(obj, (torch.Tensor, tuple, list)))


def default_identity(obj: Any) -> str:
    """The identity of a source given without one: its class's (or function's) qualified name.
    The prefix of examples in the fingerprint tells two such sources apart by content."""
    o = obj if callable(obj) and not isinstance(obj, (Dataset, IterableDataset)) else type(obj)
    return f"{getattr(o, '__module__', '?')}.{getattr(o, '__qualname__', type(o).__name__)}"


def _tensor(v: Any, what: str) -> torch.Tensor:
    t = v if isinstance(v, torch.Tensor) else torch.as_tensor(v)
    if t.dtype == torch.float64:
        t = t.float()
    return t


def as_batch(b: Any, where: str) -> Batch:
    """A collated batch as (x, y) tensors, with a one-line error for anything else."""
    if isinstance(b, dict) or not isinstance(b, (tuple, list)) or len(b) != 2:
        raise DataError(f"{where} must give (x, y) pairs, got {type(b).__name__}")
    try:
        return _tensor(b[0], "x"), _tensor(b[1], "y")
    except (TypeError, ValueError, RuntimeError) as e:
        raise DataError(f"{where} gave (x, y) that are not tensors or arrays: {e}") from None


class Part:
    """One part (train or test) of a non-tensor source (tensors `(X, y)` beside a stream count
    as a map-style set)."""

    def __init__(self, obj: Any, name: str, indices: torch.Tensor | None = None,
                 limit: int | None = None) -> None:
        if isinstance(obj, (tuple, list)) and len(obj) == 2:  # tensors beside a stream
            obj = TensorDataset(*(torch.as_tensor(t) for t in obj))
        if isinstance(obj, IterableDataset):
            self.kind = "iterable"
        elif isinstance(obj, Dataset):
            self.kind = "map"
            try:
                len(obj)  # type: ignore[arg-type]
            except TypeError:
                raise DataError(f"the {name} Dataset has no __len__: give an IterableDataset "
                                f"for a stream") from None
        elif callable(obj):
            self.kind = "factory"
        else:
            raise DataError(f"the {name} part must be tensors (X, y), a Dataset, an "
                            f"IterableDataset or a factory (batch_size, seed) -> batches; got "
                            f"{type(obj).__name__}")
        self.obj, self.name, self.indices, self.limit = obj, name, indices, limit

    def length(self) -> int | None:
        """Examples per pass, when known without reading the data."""
        n: int | None
        if self.indices is not None:
            n = len(self.indices)
        elif self.kind == "factory":
            n = None
        else:
            try:
                n = len(self.obj)
            except TypeError:  # an IterableDataset without __len__
                n = None
        if self.limit is not None:
            n = self.limit if n is None else min(n, self.limit)
        return n

    def _examples(self, order: torch.Tensor | None, epoch: int) -> Iterator[Any]:
        if self.kind == "map":
            idx = self.indices if self.indices is not None else torch.arange(len(self.obj))
            if order is not None:
                idx = idx[order]
            for i in idx.tolist():
                yield self.obj[i]
        else:
            if hasattr(self.obj, "set_epoch"):
                self.obj.set_epoch(epoch)
            yield from self.obj

    def batches(self, batch_size: int, *, gen: torch.Generator | None = None, epoch: int = 0,
                limit: int | None = None) -> Iterator[Batch]:
        """Batches of one pass: shuffled by `gen` where batchlab orders the data (map-style;
        a factory gets a seed drawn from it), in the source's own order otherwise."""
        limit = min(x for x in (limit, self.limit, math.inf) if x is not None)
        seen = 0
        where = f"the {self.name} data"
        if self.kind == "factory":
            seed = int(torch.randint(0, 2**31 - 1, (1,), generator=gen)) if gen is not None else 0
            try:
                it = iter(self.obj(batch_size, seed))
            except Exception as e:
                raise DataError(f"the {self.name} loader factory (batch_size, seed) failed: "
                                f"{type(e).__name__}: {e}") from None
            for b in it:
                x, y = as_batch(b, where)
                if seen + len(x) > limit:
                    x, y = x[: int(limit - seen)], y[: int(limit - seen)]
                if len(x):
                    yield x, y
                seen += len(x)
                if seen >= limit:
                    return
            return
        order = None
        if self.kind == "map" and gen is not None:
            n = len(self.indices) if self.indices is not None else len(self.obj)
            order = torch.randperm(n, generator=gen)
        chunk: list[Any] = []
        for ex in self._examples(order, epoch):
            chunk.append(ex)
            seen += 1
            if len(chunk) == batch_size or seen >= limit:
                yield as_batch(default_collate(chunk), where)
                chunk = []
            if seen >= limit:
                return
        if chunk:
            yield as_batch(default_collate(chunk), where)

    def head(self, n: int) -> Batch:
        """The first n examples (in the source's order), collated: a bounded read."""
        xs, ys, got = [], [], 0
        for x, y in self.batches(min(n, 256), limit=n):
            xs.append(x)
            ys.append(y)
            got += len(x)
        if not got:
            raise DataError(f"the {self.name} data yielded no examples")
        return torch.cat(xs), torch.cat(ys)

    def sample(self, n: int, seed: int) -> Batch:
        """n examples for measurements: a seeded random subset of a map-style set, the first n
        of a stream (a bounded read; a stream's start is all that can be had without a pass)."""
        if self.kind == "map":
            total = len(self.indices) if self.indices is not None else len(self.obj)
            if self.limit is not None:
                total = min(total, self.limit)
            pick = torch.randperm(total, generator=torch.Generator().manual_seed(seed))[:n].sort().values
            base = self.indices if self.indices is not None else torch.arange(total)
            return as_batch(default_collate([self.obj[i] for i in base[pick].tolist()]),
                            f"the {self.name} data")
        return self.head(n)


class StreamData:
    """A training and a test part that are not resident tensors, with the attributes the
    engine reads of `TensorData` (`n_train` None when a stream has no length)."""

    streamed = True

    def __init__(self, train: Any, test: Any = None, *, identity: str, n_classes: int | None = None,
                 max_train: int | None = None, max_test: int | None = None,
                 classification: bool = True) -> None:
        if train is None:
            raise DataError("the data source has no training part")
        split = None
        if test is None:
            if not isinstance(train, Dataset) or isinstance(train, IterableDataset):
                raise DataError("a streamed training set needs a test part: Data(train=..., "
                                "test=...)")
            from batchlab.data.tensors import split_test

            split = split_test(len(train), 0)  # type: ignore[arg-type]
            test = train
        self.train = Part(train, "training", split[0] if split else None, max_train)
        self.test = Part(test, "test", split[1] if split else None, max_test)
        self.identity = identity
        self._prefix = {p.name: p.head(PREFIX_EXAMPLES) for p in (self.train, self.test)}
        self.fingerprint = self._fingerprint(split is not None)
        x0, y0 = self._prefix["training"]
        self.input_shape = tuple(x0.shape[1:])
        self.input_dim = int(math.prod(self.input_shape)) if self.input_shape else 1
        if n_classes is None and classification and y0.dim() == 1 and not y0.dtype.is_floating_point:
            ys = torch.cat([self._prefix["training"][1], self._prefix["test"][1]])
            n_classes = int(ys.max()) + 1
        self.n_classes = int(n_classes or 0)

    eval_names = ("train", "test")

    @property
    def n_train(self) -> int | None:
        return self.train.length()

    def steps_per_epoch(self, batch_size: int) -> int | None:
        n = self.n_train
        return None if n is None else math.ceil(n / batch_size)

    def prefix(self, part: str = "training") -> Batch:
        """The first examples of a part, read when the source was opened (model checks)."""
        return self._prefix[part]

    def train_batches(self, batch_size: int, gen: torch.Generator, epoch: int) -> Iterator[Batch]:
        return self.train.batches(batch_size, gen=gen, epoch=epoch)

    def eval_batches(self, name: str) -> Iterator[Batch]:
        if name == "train":
            return self.train.batches(EVAL_BATCH, limit=EVAL_TRAIN_EXAMPLES)
        if name == "test":
            return self.test.batches(EVAL_BATCH)
        raise ConfigError(f"streamed data has no {name!r} set (val_fraction needs tensors)")

    def sample(self, n: int, seed: int) -> Batch:
        return self.train.sample(n, seed)

    def _fingerprint(self, split: bool) -> str:
        h = hashlib.sha256(b"stream-v1")
        h.update(f"{self.identity}|split10%:{split}".encode())
        for p in (self.train, self.test):
            h.update(f"|{p.name}:{p.kind}:{p.length()}".encode())
            for t in self._prefix[p.name]:
                a = t.detach().cpu().contiguous()
                h.update(f"{a.dtype}{tuple(a.shape)}".encode())
                h.update(a.numpy().tobytes())
        return h.hexdigest()


def sample_data(data: Any, n: int, seed: int, device: torch.device | str | None = None) -> Batch:
    """n training examples of resident or streamed data for a measurement: a seeded random
    subset of tensors or a map-style set, the first n of a stream. Bounded in memory."""
    if getattr(data, "streamed", False):
        x, y = data.sample(n, seed)
        dev = device or "cpu"
        return x.to(dev), y.to(dev)
    x, y = data.x_train, data.y_train
    n = min(n, len(y))
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(y), generator=gen)[:n].to(x.device)
    return x.index_select(0, idx), y.index_select(0, idx)


Factory = Callable[[int, int], Any]
