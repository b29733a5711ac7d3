"""Task pools: run independent, deterministic units of work (a chunk of gradient trials, a
curvature measurement) here on worker threads or on a Ray cluster, with one driver loop.

The driver submits tasks, takes each result as soon as it is done (`next_done`) and stores it
before it asks for the next one, so an interrupted driver or a killed worker loses at most the
tasks in flight. A task's result must be a function of its arguments alone (each task pins its
own thread count), so both pools give the same numbers.

- `LocalPool`: `workers` threads; on the CPU each runs with ONE intra-op thread (torch releases
  the GIL inside kernels, so single-threaded tasks on parallel threads use every core).
- `RayPool`: one Ray task per unit asking for one CPU (Ray retries a task whose worker or node
  died, `max_retries` times; an exception raised by the task itself is not retried). Large
  read-only arguments go through `shared`: put in the object store once, fetched once per
  worker process and kept there for the following tasks.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from batchlab.errors import BatchlabError, ConfigError

EXECUTORS = ("local", "ray")


class TaskPool(Protocol):
    def shared(self, key: str, value: Any) -> Any: ...
    def submit(self, fn: Callable[..., Any], *args: Any) -> Any: ...
    def next_done(self) -> tuple[Any, Any]: ...
    def pending(self) -> int: ...
    def cancel_all(self) -> None: ...
    def close(self) -> None: ...


@contextmanager
def threads(n: int) -> Iterator[None]:
    """Run with n intra-op threads (this thread's OpenMP setting and torch's), then restore."""
    old = torch.get_num_threads()
    torch.set_num_threads(max(1, n))
    try:
        yield
    finally:
        torch.set_num_threads(old)


class LocalPool:
    """Tasks on `workers` threads in this process (single-threaded kernels on the CPU)."""

    def __init__(self, workers: int, cpu: bool = True) -> None:
        self.cpu = cpu
        self._old_threads = torch.get_num_threads()
        if cpu:
            torch.set_num_threads(1)
        init = (lambda: torch.set_num_threads(1)) if cpu else None
        self._pool = ThreadPoolExecutor(max_workers=max(1, workers), initializer=init)
        self._futures: set[Future] = set()

    def shared(self, key: str, value: Any) -> Any:
        return value

    def submit(self, fn: Callable[..., Any], *args: Any) -> Future:
        fut = self._pool.submit(fn, *args)
        self._futures.add(fut)
        return fut

    def next_done(self) -> tuple[Future, Any]:
        done, _ = wait(self._futures, return_when=FIRST_COMPLETED)
        # results before failures: work that finished is handed back (and stored) before an
        # error or an interrupt from another task stops the driver; otherwise any order
        fut = min(done, key=lambda f: (f.exception() is not None, id(f)))
        self._futures.discard(fut)
        return fut, fut.result()

    def pending(self) -> int:
        return len(self._futures)

    def cancel_all(self) -> None:
        for f in self._futures:
            f.cancel()
        self._futures.clear()

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
        torch.set_num_threads(self._old_threads)


@dataclass(frozen=True)
class Shared:
    """A large read-only task argument in Ray's object store. The ref is wrapped in a list so
    Ray does not resolve it at every submit; workers fetch it once and keep it (by key)."""

    key: str
    ref: list


_WORKER_CACHE: dict[str, Any] = {}
_CACHE_LOCK = threading.Lock()


def _resolve(arg: Any) -> Any:
    if not isinstance(arg, Shared):
        return arg
    import ray

    with _CACHE_LOCK:
        if arg.key not in _WORKER_CACHE:
            if len(_WORKER_CACHE) > 8:
                _WORKER_CACHE.clear()
            _WORKER_CACHE[arg.key] = ray.get(arg.ref[0])
        return _WORKER_CACHE[arg.key]


def call_task(fn: Callable[..., Any], *args: Any) -> Any:
    """The body of every Ray task: resolve shared arguments, then call `fn`."""
    return fn(*[_resolve(a) for a in args])


class RayPool:
    """Tasks as Ray tasks of one CPU each, on the cluster at `address` (None: a local Ray)."""

    def __init__(self, address: str | None = None, max_retries: int = 3,
                 num_cpus: int | None = None) -> None:
        import ray

        from batchlab.runs.ray_executor import ensure_ray

        if max_retries < 0:
            raise ConfigError(f"max_retries must be >= 0, got {max_retries}")
        ensure_ray(address, num_cpus)
        self._ray = ray
        self._remote = ray.remote(call_task).options(num_cpus=1, max_retries=max_retries,
                                                     retry_exceptions=False)
        self._pending: set[Any] = set()
        self._refs: dict[str, Shared] = {}

    def shared(self, key: str, value: Any) -> Shared:
        if key not in self._refs:
            self._refs[key] = Shared(key, [self._ray.put(value)])
        return self._refs[key]

    def submit(self, fn: Callable[..., Any], *args: Any) -> Any:
        ref = self._remote.remote(fn, *args)
        self._pending.add(ref)
        return ref

    def next_done(self) -> tuple[Any, Any]:
        ready, _ = self._ray.wait(list(self._pending), num_returns=1)
        ref = ready[0]
        self._pending.discard(ref)
        try:
            return ref, self._ray.get(ref)
        except self._ray.exceptions.RayTaskError as e:  # the task raised: re-raise its error
            cause = e.as_instanceof_cause()
            if isinstance(cause, BatchlabError):
                raise cause from None
            raise
        except self._ray.exceptions.RayError as e:  # worker/node lost beyond the retries
            first = (str(e).strip().splitlines() or [""])[0]
            raise BatchlabError(f"a Ray task failed after its retries: {type(e).__name__}: "
                                f"{first[:300]}") from None

    def pending(self) -> int:
        return len(self._pending)

    def cancel_all(self) -> None:
        for ref in self._pending:
            self._ray.cancel(ref, force=True)
        self._pending.clear()

    def close(self) -> None:
        self.cancel_all()


def make_pool(executor: str, *, workers: int = 1, cpu: bool = True,
              ray_address: str | None = None, max_retries: int = 3) -> TaskPool:
    """A pool for `executor` (local or ray)."""
    if executor == "local":
        return LocalPool(workers, cpu)
    if executor == "ray":
        try:
            import ray  # noqa: F401
        except ImportError as e:
            raise BatchlabError(f"--executor ray needs Ray: pip install 'batchlab[ray]' ({e})"
                                ) from None
        return RayPool(ray_address, max_retries)
    raise ConfigError(f"unknown executor {executor!r}; use local or ray")
