"""Task pools: run independent, deterministic units of work (a chunk of gradient trials, a
curvature measurement) here on worker threads or on a Ray cluster, with one driver loop.

The driver submits tasks, takes each result as soon as it is done (`next_done`) and stores it
before it asks for the next one, so an interrupted driver or a killed worker loses at most the
tasks in flight. A task's result must be a function of its arguments alone (each task pins its
own thread count), so both pools give the same numbers.

- `LocalPool`: `workers` threads; on the CPU each runs with ONE intra-op thread (torch releases
  the GIL inside kernels, so single-threaded tasks on parallel threads use every core).
- `RayPool`: one Ray task per unit asking for one CPU, or the resources `submit` names (Ray
  retries a task whose worker or node died, `max_retries` times; an exception raised by the
  task itself is not retried). Large read-only arguments go through `shared`: put in the
  object store once, fetched once per worker process and kept there for the following tasks.
  It is the only Ray driver: the training executor (`runs.ray_executor`) submits its runs
  through it too, so a dead worker, a task's exception or a lost cluster reads the same
  wherever it happens (`TaskFailed`, one line).
"""

from __future__ import annotations

import atexit
import socket
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


class TaskFailed(BatchlabError):
    """A Ray task that gave no result: it raised, or its worker or node died more often than
    `max_retries` allowed, or the cluster went away. One line (`ray_failure`), so the CLI
    prints it as it prints bad input, but exits 1: the input was fine, the work failed;
    `task` is the handle `submit` returned (None when the
    cluster itself failed and no task can be named), so a driver that keeps going (the
    training executor stores the runs of that task as failed) knows which work it lost."""

    exit_code = 1

    def __init__(self, message: str, task: Any = None) -> None:
        super().__init__(message)
        self.task = task


def ray_failure(error: BaseException, max_retries: int) -> str:
    """The one-line message for a Ray error: the task's own exception (its type and first
    line, not Ray's remote traceback), or a lost worker/node/cluster with the retries spent."""
    import ray

    if isinstance(error, ray.exceptions.RayTaskError):
        cause = error.cause
        return f"a Ray task raised {type(cause).__name__}: {_first_line(cause)}"
    return (f"a Ray task was lost after {max_retries} retries (its worker, node or the "
            f"cluster died): {type(error).__name__}: {_first_line(error)}")


def _first_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [""])[0][:300]


class RayPool:
    """Tasks as Ray tasks of one CPU each (or what `submit` asks for), on the cluster at
    `address` (None: a local Ray with `num_cpus` cores)."""

    def __init__(self, address: str | None = None, max_retries: int = 3,
                 num_cpus: int | None = None) -> None:
        import ray

        if max_retries < 0:
            raise ConfigError(f"max_retries must be >= 0, got {max_retries}")
        ensure_ray(address, num_cpus)
        self._ray = ray
        self.max_retries = max_retries
        self._task = ray.remote(call_task)
        self._options = {"max_retries": max_retries, "retry_exceptions": False}
        self._pending: set[Any] = set()
        self._refs: dict[str, Shared] = {}

    def shared(self, key: str, value: Any) -> Shared:
        if key not in self._refs:
            self._refs[key] = Shared(key, [self._ray.put(value)])
        return self._refs[key]

    def submit(self, fn: Callable[..., Any], *args: Any, num_cpus: int = 1,
               num_gpus: float = 0.0) -> Any:
        """Run fn(*args) as a Ray task holding `num_cpus` cores and `num_gpus` GPUs."""
        gpus = {"num_gpus": num_gpus} if num_gpus else {}
        ref = self._task.options(num_cpus=num_cpus, **self._options, **gpus).remote(fn, *args)
        self._pending.add(ref)
        return ref

    def next_done(self) -> tuple[Any, Any]:
        """The next finished task and its result. A BatchlabError the task raised (bad input)
        comes back as itself; every other failure as `TaskFailed`."""
        errors = self._ray.exceptions
        try:
            ready, _ = self._ray.wait(list(self._pending), num_returns=1)
        except errors.RayError as e:  # the cluster, not one task
            raise TaskFailed(ray_failure(e, self.max_retries)) from None
        ref = ready[0]
        self._pending.discard(ref)
        try:
            return ref, self._ray.get(ref)
        except errors.RayTaskError as e:  # the task raised: not retried
            cause = e.as_instanceof_cause()
            if isinstance(cause, BatchlabError):
                raise cause from None
            raise TaskFailed(ray_failure(e, self.max_retries), ref) from e
        except errors.RayError as e:  # worker/node lost beyond the retries
            raise TaskFailed(ray_failure(e, self.max_retries), ref) from None

    def pending(self) -> int:
        return len(self._pending)

    def cancel_all(self) -> None:
        for ref in self._pending:
            self._ray.cancel(ref, force=True)
        self._pending.clear()

    def close(self) -> None:
        self.cancel_all()


def ensure_ray(address: str | None, num_cpus: int | None) -> None:
    """Connect to `address`, or start a local Ray for the rest of this process (one per
    command: `reproduce` calls the executor once per experiment and must not pay the ~5 s
    start-up each time). A Ray already initialized by the caller is used as is.

    Ray's messages never reach stdout (where `--json` puts its one object): workers' output
    stays with the workers (`log_to_driver=False`), Ray's own logging goes to stderr, and the
    error messages Ray's driver thread prints (a worker died, a node was lost) are sent to
    stderr too (`_ray_messages_to_stderr`)."""
    import ray

    _ray_messages_to_stderr()
    if ray.is_initialized():
        return
    kw: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False,
                          "logging_level": "WARNING"}
    try:
        if address:
            check_reachable(address)
            ray.init(address=address, **kw)
        else:
            # "local": a new instance, never a cluster some other process left running here
            ray.init(address="local", num_cpus=num_cpus, **kw)
    except ConnectionError as e:
        raise BatchlabError(f"cannot connect to Ray at {address}: {e}") from None
    atexit.register(ray.shutdown)


def _ray_messages_to_stderr() -> None:
    """Ray's driver prints cluster error messages (worker deaths, lost nodes) through
    `ray._private.worker.print_to_stdstream` marked as stdout; mark them as errors so they go
    to stderr. A Ray without that hook is left as it is (the `--json` test would show it)."""
    import ray._private.worker as rw

    original = getattr(rw, "print_to_stdstream", None)
    if original is None or getattr(original, "_batchlab_stderr", False):
        return

    def to_stderr(data: dict[str, Any], ignore_prefix: bool) -> None:
        original({**data, "is_err": True}, ignore_prefix)

    to_stderr._batchlab_stderr = True  # type: ignore[attr-defined]
    rw.print_to_stdstream = to_stderr


def check_reachable(address: str, timeout: float = 5.0) -> None:
    """Fail in seconds on a wrong HOST:PORT: Ray itself keeps retrying for minutes."""
    if address == "auto":
        return  # Ray finds the local cluster's address itself and fails fast without one
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        raise ConfigError(f"--ray-address must be auto or HOST:PORT, got {address!r}")
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
    except OSError as e:
        raise BatchlabError(f"cannot reach the Ray cluster at {address}: {e}") from None


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
