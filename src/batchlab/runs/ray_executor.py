"""Run a list of configs as Ray tasks; this process stays the only writer of the store.

Design, and why:
- Each run is one Ray task with declared resources (`num_cpus`, plus `num_gpus` when it trains
  on CUDA), so Ray packs runs onto the cluster without oversubscribing cores. Runs that the
  local executor trains together in one vectorized pass (`batchlab.engine.vectorized.plan_groups`)
  form one task here too, so both executors compute exactly the same thing.
- The raw uint8 dataset is `ray.put` once per sweep; tasks take the ObjectRef, which each node
  fetches into its shared-memory object store once and every task there maps zero-copy. A
  worker process keeps its prepared float tensors between tasks, so no task reloads from disk.
- Tasks call the very same `train()`/`train_group()` as the local executor (no store) and return a
  plain record: metrics plus weights as safetensors bytes. The driver saves each record as soon
  as `ray.wait` hands it back, with the same `save_result` the local path uses. Only one process ever
  writes SQLite, so there is no lock contention and no half row.
- Idempotent: the config hash is the key. Finished runs are skipped before anything is
  submitted, and a retried task cannot duplicate a row because `Store.save_run` replaces by key.
- Faults: a killed worker process is a system failure that Ray retries (`max_retries`); an
  exception in training is caught inside the task and comes back as a `failed` record, so it is
  stored with its error and never retried; divergence is an ordinary `diverged` result. On
  Ctrl-C the driver cancels the outstanding tasks; every stored run is complete, so re-running
  resumes.
"""

from __future__ import annotations

import atexit
import socket
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import ray
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from batchlab.config import TrainConfig
from batchlab.data import RawData, TensorData, load_dataset, prepare
from batchlab.engine.result import TrainResult
from batchlab.engine.setup import build_model, resolve_device, run_key
from batchlab.engine.vectorized import plan_groups, train_group
from batchlab.errors import BatchlabError, ConfigError
from batchlab.runs.store import Store
from batchlab.runs.training import save_result, train


@dataclass
class RunOutcome:
    """What a task sends back: everything the driver needs to store the run, all picklable."""

    key: str
    run_id: str
    status: str
    epochs: list[dict[str, Any]]
    final: dict[str, Any]
    env: dict[str, Any]
    wall_seconds: float
    error: str | None = None
    config_error: str | None = None  # a ConfigError aborts the sweep, as in the local executor
    checkpoints: dict[int, bytes] = field(default_factory=dict)  # epoch -> safetensors bytes
    model_state: bytes | None = None
    init_state: bytes | None = None


# -- the task side ----------------------------------------------------------------------------
_WORKER_DATA: dict[tuple, TensorData] = {}


def _worker_data(cfg: TrainConfig, raw: RawData, device: torch.device) -> TensorData:
    """Float tensors for this config, prepared once per worker process (same args as
    `engine.setup.get_data`, so the tensors are identical to the local executor's)."""
    k = (raw.fingerprint, cfg.normalize, cfg.val_fraction, cfg.max_train, cfg.max_test,
         str(device))
    if k not in _WORKER_DATA:
        if len(_WORKER_DATA) > 4:
            _WORKER_DATA.clear()
        with warnings.catch_warnings():
            # object-store arrays are read-only; prepare() copies x, y is only ever indexed
            warnings.filterwarnings("ignore", message=".*not writable.*")
            _WORKER_DATA[k] = prepare(raw, normalize=cfg.normalize, val_fraction=cfg.val_fraction,
                                      max_train=cfg.max_train, max_test=cfg.max_test,
                                      device=device)
    return _WORKER_DATA[k]


def _pack(state: dict[str, torch.Tensor]) -> bytes:
    return st_save({k: v.detach().to("cpu").contiguous() for k, v in state.items()})


def _outcome(res: TrainResult, seconds: float) -> RunOutcome:
    return RunOutcome(
        key=res.key, run_id=res.run_id, status=res.status, epochs=res.epochs, final=res.final,
        env=res.env, wall_seconds=res.wall_seconds or seconds, error=res.error,
        checkpoints={ep: _pack(s) for ep, s in res.checkpoints.items()},
        model_state=_pack(res.model.state_dict()) if res.model is not None else None,
        init_state=_pack(res.init_state) if res.init_state is not None else None,
    )


def _failure(key: str, error: BaseException, rows: list[dict[str, Any]] | None = None,
             seconds: float = 0.0) -> RunOutcome:
    config_error = str(error) if isinstance(error, ConfigError) else None
    return RunOutcome(key=key, run_id=key[:12], status="failed", epochs=rows or [], final={},
                      env={}, wall_seconds=seconds, config_error=config_error,
                      error=config_error or f"{type(error).__name__}: {error}")


def _train_one(cfg: TrainConfig, td: TensorData, key: str) -> RunOutcome:
    rows: list[dict[str, Any]] = []
    t0 = time.perf_counter()
    try:
        res = train(cfg, data=td, on_epoch=rows.append)
    except Exception as e:  # deterministic: stored as failed, never retried
        return _failure(key, e, rows, time.perf_counter() - t0)
    return _outcome(res, time.perf_counter() - t0)


def train_unit(configs: list[TrainConfig], raw: RawData, num_threads: int) -> list[RunOutcome]:
    """Body of one Ray task: one run, or a group that `run_local` would also train in one
    vectorized pass (`batchlab.engine.vectorized`), so both executors compute exactly the same thing.
    A plain function, so it is testable without Ray."""
    torch.set_num_threads(max(1, int(num_threads)))
    # Ray exposes only the GPU it assigned, always as cuda:0; device is not part of the key
    cfgs = [c.model_copy(update={"device": "cuda"}) if c.device.startswith("cuda") else c
            for c in configs]
    keys = [run_key(c, raw) for c in cfgs]
    try:
        td = _worker_data(cfgs[0], raw, resolve_device(cfgs[0].device))
    except Exception as e:
        return [_failure(k, e) for k in keys]
    if len(cfgs) > 1:
        t0 = time.perf_counter()
        try:
            group = train_group(cfgs, td)
            return [_outcome(r, (time.perf_counter() - t0) / len(cfgs)) for r in group]
        except ConfigError as e:
            return [_failure(k, e) for k in keys]
        except Exception as e:  # as run_local: every run of the pass failed, none is retried
            return [_failure(k, e, seconds=time.perf_counter() - t0) for k in keys]
    return [_train_one(c, td, k) for c, k in zip(cfgs, keys)]


_remote_unit = ray.remote(train_unit)


# -- the driver side --------------------------------------------------------------------------
def ensure_ray(address: str | None, num_cpus: int | None) -> None:
    """Connect to `address`, or start a local Ray for the rest of this process (one per
    command: `reproduce` calls the executor once per experiment and must not pay the ~5 s
    start-up each time). A Ray already initialized by the caller is used as is.

    Ray's messages never reach stdout (where `--json` puts its one object): workers' output
    stays with the workers (`log_to_driver=False`), Ray's own logging goes to stderr, and the
    error messages Ray's driver thread prints (a worker died, a node was lost) are sent to
    stderr too (`_ray_messages_to_stderr`)."""
    _ray_messages_to_stderr()
    if ray.is_initialized():
        return
    kw: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False,
                          "logging_level": "WARNING"}
    try:
        if address:
            _check_reachable(address)
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


def _check_reachable(address: str, timeout: float = 5.0) -> None:
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


def _wants_gpu(cfg: TrainConfig, cluster_gpus: float) -> bool:
    if cfg.device.startswith("cuda"):
        if cluster_gpus <= 0:
            raise ConfigError(f"device {cfg.device} requested but the Ray cluster has no GPU")
        return True
    return cfg.device == "auto" and cluster_gpus > 0


def _cached_result(cfg: TrainConfig, key: str, store: Store) -> TrainResult | None:
    rec = store.finished(key)
    if rec is None:
        return None
    return TrainResult(run_id=rec.run_id, key=key, config=cfg, status=rec.status,
                       epochs=rec.epochs, final=rec.final, artifacts=rec.artifacts, env=rec.env,
                       wall_seconds=rec.wall_seconds or 0.0, cached=True)


def _to_result(cfg: TrainConfig, out: RunOutcome) -> TrainResult:
    res = TrainResult(run_id=out.run_id, key=out.key, config=cfg, status=out.status,
                      epochs=out.epochs, final=out.final, env=out.env, error=out.error,
                      checkpoints={ep: st_load(b) for ep, b in out.checkpoints.items()})
    if out.init_state is not None:
        res.init_state = st_load(out.init_state)
    if out.model_state is not None:
        # a CPU copy of the trained model, as `run_local` would hand back; built by the
        # engine's own factory, which only needs the data's shapes
        raw = load_dataset(cfg.dataset, cfg.data_dir)
        dim = int(raw.x_train.shape[1])
        shapes = TensorData(x_train=torch.empty(0, dim), y_train=torch.empty(0), eval_sets={},
                            input_dim=dim, n_classes=10, fingerprint=raw.fingerprint)
        model = build_model(cfg, shapes)
        model.load_state_dict(st_load(out.model_state))
        res.model = model
    return res


def _crash_outcome(key: str, error: Exception, max_retries: int) -> RunOutcome:
    first = (str(error).strip().splitlines() or [""])[0]
    msg = f"{type(error).__name__} (max_retries={max_retries}): {first}"
    return RunOutcome(key=key, run_id=key[:12], status="failed", epochs=[], final={}, env={},
                      wall_seconds=0.0, error=msg[:500])


def run_ray(configs: Sequence[TrainConfig], store: Store, *, address: str | None = None,
            label: str | None = None, progress: Callable[[str, float, float], None] | None = None, max_retries: int = 3,
            num_cpus_per_task: int = 1, num_gpus_per_task: float = 1.0,
            num_cpus: int | None = None) -> list[TrainResult]:
    """Train `configs` as Ray tasks and store each run as it finishes; results in input order.

    address: "auto" or "HOST:PORT" of a running cluster; None starts a local Ray with
    `num_cpus` (default: all cores). num_gpus_per_task < 1 packs several small runs on a GPU.
    Runs that `run_local` would train in one vectorized pass form one task here as well.
    """
    from batchlab.runs.sweep import validate_against_data

    if max_retries < 0:
        raise ConfigError(f"max_retries must be >= 0, got {max_retries}")
    if num_cpus_per_task < 1:
        raise ConfigError(f"num_cpus_per_task must be >= 1, got {num_cpus_per_task}")
    validate_against_data(configs)  # bad input fails before the cluster is touched

    results: dict[str, TrainResult] = {}
    todo: dict[str, TrainConfig] = {}  # key -> config (identical configs train once)
    keys: list[str] = []
    for cfg in configs:
        key = run_key(cfg, load_dataset(cfg.dataset, cfg.data_dir))
        keys.append(key)
        if key in results or key in todo:
            continue
        cached = _cached_result(cfg, key, store)
        if cached is not None:
            results[key] = cached
        else:
            todo[key] = cfg

    if todo:
        ensure_ray(address, num_cpus)
        _submit_and_collect(todo, results, store, label=label, progress=progress,
                            max_retries=max_retries, num_cpus_per_task=num_cpus_per_task,
                            num_gpus_per_task=num_gpus_per_task,
                            n_cached=len(results))
    return [results[k] for k in keys]


def _submit_and_collect(todo: dict[str, TrainConfig], results: dict[str, TrainResult],
                        store: Store, *, label: str | None, progress: Callable[[str, float, float], None] | None,
                        max_retries: int, num_cpus_per_task: int, num_gpus_per_task: float,
                        n_cached: int) -> None:
    gpus = float(ray.cluster_resources().get("GPU", 0.0))
    todo_keys = list(todo)
    units = []  # (keys, configs, task options), all checked before anything is submitted
    for unit in plan_groups([todo[k] for k in todo_keys]):
        cfgs = [todo[todo_keys[i]] for i in unit]
        opts: dict[str, Any] = {"num_cpus": num_cpus_per_task, "max_retries": max_retries,
                                "retry_exceptions": False}
        if _wants_gpu(cfgs[0], gpus):
            opts["num_gpus"] = num_gpus_per_task
        units.append(([todo_keys[i] for i in unit], cfgs, opts))

    data_refs: dict[str, ray.ObjectRef] = {}  # one object-store copy per dataset
    pending: dict[ray.ObjectRef, list[str]] = {}  # task -> keys of its runs
    name, total, done = f"{label or 'runs'} (ray)", n_cached + len(todo), [n_cached]

    def advance() -> None:  # progress(description, done, total): the CLI draws a bar
        done[0] += 1
        if progress is not None:
            progress(name, done[0], total)

    try:
        for unit_keys, cfgs, opts in units:
            raw = load_dataset(cfgs[0].dataset, cfgs[0].data_dir)
            if raw.fingerprint not in data_refs:
                data_refs[raw.fingerprint] = ray.put(raw)
            ref = _remote_unit.options(**opts).remote(cfgs, data_refs[raw.fingerprint],
                                                      num_cpus_per_task)
            pending[ref] = unit_keys
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            unit_keys = pending.pop(ready[0])
            try:
                outs: list[RunOutcome] = ray.get(ready[0])
            except ray.exceptions.RayError as e:  # retries exhausted, or escaped the task
                outs = [_crash_outcome(k, e, max_retries) for k in unit_keys]
            for key, out in zip(unit_keys, outs, strict=True):
                if out.config_error is not None:
                    raise ConfigError(out.config_error)
                res = _to_result(todo[key], out)
                save_result(store, res, label, time.perf_counter() - out.wall_seconds)
                results[key] = res
                advance()
    except BaseException:
        # Ctrl-C or an abort: stop the cluster's work; every stored run is whole
        for ref in pending:
            ray.cancel(ref, force=True)
        raise
