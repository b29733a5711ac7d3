"""Run a list of configs as Ray tasks; this process stays the only writer of the store.

Design, and why:
- Each run is one Ray task with declared resources (`num_cpus`, plus `num_gpus` when it trains
  on CUDA), so Ray packs runs onto the cluster without oversubscribing cores. Runs that the
  local executor trains together in one vectorized pass (`batchlab.engine.vectorized.stack_groups`)
  form one task here too, so both executors compute exactly the same thing.
- The driver is `batchlab.runs.tasks.RayPool`, the one Ray driver of the package (measurement
  and gradient-trial tasks use it too): it submits, hands back each task as it finishes,
  cancels, and words every Ray failure the same way (`TaskFailed`).
- The raw uint8 dataset goes into the object store once per sweep (`RayPool.shared`); each
  worker process fetches it once and keeps it, with its prepared float tensors
  (`batchlab.data.prepare_for`, the preparation the local executor uses), between tasks, so
  no task reloads from disk.
- Tasks call the very same `train()`/`train_group()` as the local executor (no store) and return a
  plain record: metrics plus weights as safetensors bytes. The driver saves each record as soon
  as the pool hands it back, with the same `save_result` the local path uses. Only one process ever
  writes SQLite, so there is no lock contention and no half row.
- Idempotent: the config hash is the key. Finished runs are skipped before anything is
  submitted, and a retried task cannot duplicate a row because `Store.save_run` replaces by key.
- Faults: a killed worker process is a system failure that Ray retries (`max_retries`); an
  exception in training is caught inside the task and comes back as a `failed` record, so it is
  stored with its error and never retried; a task lost beyond its retries stores its runs as
  failed with the pool's one-line message; divergence is an ordinary `diverged` result. On
  Ctrl-C the driver cancels the outstanding tasks; every stored run is complete, so re-running
  resumes.
"""

from __future__ import annotations

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
from batchlab.data import RawData, TensorData, load_dataset, prepare_for
from batchlab.engine.result import TrainResult
from batchlab.engine.setup import build_model, resolve_device, run_key
from batchlab.engine.vectorized import stack_groups, train_group
from batchlab.errors import ConfigError
from batchlab.runs.store import Store
from batchlab.runs.tasks import RayPool, TaskFailed
from batchlab.runs.training import save_result, stored_or_todo, train


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
def _worker_data(cfg: TrainConfig, raw: RawData, device: torch.device) -> TensorData:
    """Float tensors for this config, prepared once per worker process by the local
    executor's own `prepare_for`, so the tensors are identical to its."""
    with warnings.catch_warnings():
        # object-store arrays are read-only; prepare() copies x, y is only ever indexed
        warnings.filterwarnings("ignore", message=".*not writable.*")
        return prepare_for(raw, cfg, device)


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
    # a lost task is worded by the pool already; an exception in training gets its type
    message = str(error) if isinstance(error, TaskFailed) else f"{type(error).__name__}: {error}"
    return RunOutcome(key=key, run_id=key[:12], status="failed", epochs=rows or [], final={},
                      env={}, wall_seconds=seconds, config_error=config_error,
                      error=config_error or message)


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


_task_body = train_unit  # what each Ray task runs (a test swaps in a hooked copy)


# -- the driver side --------------------------------------------------------------------------
def _wants_gpu(cfg: TrainConfig, cluster_gpus: float) -> bool:
    if cfg.device.startswith("cuda"):
        if cluster_gpus <= 0:
            raise ConfigError(f"device {cfg.device} requested but the Ray cluster has no GPU")
        return True
    return cfg.device == "auto" and cluster_gpus > 0


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

    keys = [run_key(cfg, load_dataset(cfg.dataset, cfg.data_dir)) for cfg in configs]
    results, first = stored_or_todo(store, configs, keys)
    todo = {key: configs[i] for key, i in first.items()}  # identical configs train once

    if todo:
        pool = RayPool(address, max_retries, num_cpus)
        _submit_and_collect(pool, todo, results, store, label=label, progress=progress,
                            num_cpus_per_task=num_cpus_per_task,
                            num_gpus_per_task=num_gpus_per_task, n_cached=len(results))
    return [results[k] for k in keys]


def _submit_and_collect(pool: RayPool, todo: dict[str, TrainConfig],
                        results: dict[str, TrainResult], store: Store, *, label: str | None,
                        progress: Callable[[str, float, float], None] | None,
                        num_cpus_per_task: int, num_gpus_per_task: float,
                        n_cached: int) -> None:
    gpus = float(ray.cluster_resources().get("GPU", 0.0))
    todo_keys = list(todo)
    units = []  # (keys, configs, GPUs per task), all checked before anything is submitted
    for unit in stack_groups([todo[k] for k in todo_keys]):
        cfgs = [todo[todo_keys[i]] for i in unit]
        n_gpus = num_gpus_per_task if _wants_gpu(cfgs[0], gpus) else 0.0
        units.append(([todo_keys[i] for i in unit], cfgs, n_gpus))

    pending: dict[Any, list[str]] = {}  # task -> keys of its runs
    name, total, done = f"{label or 'runs'} (ray)", n_cached + len(todo), [n_cached]

    def advance() -> None:  # progress(description, done, total): the CLI draws a bar
        done[0] += 1
        if progress is not None:
            progress(name, done[0], total)

    try:
        for unit_keys, cfgs, n_gpus in units:
            raw = load_dataset(cfgs[0].dataset, cfgs[0].data_dir)
            data = pool.shared(f"raw:{raw.fingerprint}", raw)  # one object-store copy
            ref = pool.submit(_task_body, cfgs, data, num_cpus_per_task,
                              num_cpus=num_cpus_per_task, num_gpus=n_gpus)
            pending[ref] = unit_keys
        while pending:
            try:
                ref, outs = pool.next_done()
                unit_keys = pending.pop(ref)
            except TaskFailed as e:  # lost beyond its retries, or raised outside training
                if e.task is None:
                    raise  # the cluster itself: no run can be named
                unit_keys = pending.pop(e.task)
                outs = [_failure(k, e) for k in unit_keys]
            for key, out in zip(unit_keys, outs, strict=True):
                if out.config_error is not None:
                    raise ConfigError(out.config_error)
                res = _to_result(todo[key], out)
                save_result(store, res, label, time.perf_counter() - out.wall_seconds)
                results[key] = res
                advance()
    except BaseException:
        # Ctrl-C or an abort: stop the cluster's work; every stored run is whole
        pool.cancel_all()
        raise
