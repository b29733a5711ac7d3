"""Train with a store: a finished run is looked up by its key instead of being recomputed,
and a new run (completed, diverged or failed) is saved with its safetensors checkpoints.

The engine (`batchlab.engine`) only computes results; this module decides what is stored.
`train` is `batchlab.train`; `train_many` trains a list of configs, vectorizing the groups
that `engine.vectorized.plan_groups` picks (it logs why any other config runs alone).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

from torch import nn

from batchlab.config import TrainConfig, make_config
from batchlab.data import TensorData
from batchlab.data.idx import sha256_file
from batchlab.engine.loop import EpochHook, train_one
from batchlab.engine.result import Reporter, TrainResult, clean
from batchlab.engine.setup import check_batch_sizes, get_data, resolve_device, run_key
from batchlab.engine.vectorized import plan_groups, train_group
from batchlab.errors import BatchlabError
from batchlab.nn.checkpoint import save_state
from batchlab.probes import Probe
from batchlab.runs.store import RunRecord, Store


def train(
    config: TrainConfig | dict[str, Any],
    *,
    store: Store | str | Path | None = None,
    label: str | None = None,
    probes: list[Probe] | None = None,
    reporter: Reporter | None = None,
    model: nn.Module | None = None,
    data: TensorData | None = None,
    on_epoch: EpochHook | None = None,
) -> TrainResult:
    """Train one run. With a store, a finished run with the same key is returned from the
    store instead of being recomputed (`result.cached`), and a new run is saved atomically.
    A crash inside training is saved as a `failed` run, then raised.

    `model`/`data` let callers (user factories, `recommend`) supply their own module and
    tensors; then the key also covers the module's initial weights.
    """
    res = _train_and_store(config, store=store, label=label, probes=probes, reporter=reporter,
                           model=model, data=data, on_epoch=on_epoch)
    if res.exception is not None:
        raise res.exception
    return res


def _train_and_store(config: TrainConfig | dict[str, Any], *, store: Store | str | Path | None,
                     label: str | None, **kw: Any) -> TrainResult:
    if isinstance(store, (str, Path)):
        # a store given by path is ours to close (which also checkpoints SQLite's WAL, so the
        # file is complete on its own once train() returns)
        with Store(store) as st:
            return _train_and_store(config, store=st, label=label, **kw)
    cfg = as_config(config)
    st = store
    t0 = time.perf_counter()
    if st is not None:
        td = kw["data"] if kw.get("data") is not None else get_data(cfg, resolve_device(cfg.device))
        check_batch_sizes(cfg, td)
        cached = cached_result(st, cfg, run_key(cfg, td, kw.get("model")))
        if cached is not None:
            return cached
        kw["data"] = td
    res = train_one(cfg, **kw)
    res.wall_seconds = time.perf_counter() - t0
    if st is not None:
        save_result(st, res, label)
    return res


def train_many(configs: Sequence[TrainConfig | dict[str, Any]], store: Store | None = None,
               label: str | None = None, *, on_error: Literal["raise", "record"] = "raise",
               on_done: Callable[[int], None] | None = None) -> list[TrainResult]:
    """Train `configs` (results in order), vectorizing the groups `plan_groups` picks and
    training the rest one by one. Runs already finished in `store` come back cached; new ones
    are saved exactly as `train()` saves them; a config listed twice is trained once.

    A crash inside training is saved as failed (a vectorized pass: every run it was training)
    and never retried; `on_error="raise"` then raises it, `"record"` returns the failed results
    and goes on (sweeps). A `BatchlabError` (bad input) always raises. `on_done(n)` is called
    as n more configs are done (progress)."""
    cfgs = [as_config(c) for c in configs]
    keys = [c.key(get_data(c, resolve_device(c.device)).fingerprint) for c in cfgs]
    results: list[TrainResult | None] = [None] * len(cfgs)
    first: dict[str, int] = {}
    todo: list[int] = []
    for i, key in enumerate(keys):
        if key in first:
            continue
        first[key] = i
        cached = cached_result(store, cfgs[i], key) if store is not None else None
        if cached is not None:
            results[i] = cached
        else:
            todo.append(i)
    if on_done is not None:
        on_done(len(cfgs) - len(todo))
    for unit in plan_groups([cfgs[i] for i in todo]):
        idxs = [todo[j] for j in unit]
        if len(idxs) >= 2:
            group = train_group([cfgs[i] for i in idxs],
                                get_data(cfgs[idxs[0]], resolve_device(cfgs[idxs[0]].device)))
            if store is not None:
                for res in group:
                    save_result(store, res, label)
        else:
            group = [_train_alone(cfgs[idxs[0]], keys[idxs[0]], store, label, on_error)]
        for i, res in zip(idxs, group):
            results[i] = res
        failed = next((r.exception for r in group if r.exception is not None), None)
        if failed is not None and (on_error == "raise" or isinstance(failed, BatchlabError)):
            raise failed
        if on_done is not None:
            on_done(len(idxs))
    return [r if r is not None else results[first[k]] for r, k in zip(results, keys)]


def _train_alone(cfg: TrainConfig, key: str, store: Store | None, label: str | None,
                 on_error: str) -> TrainResult:
    try:
        return _train_and_store(cfg, store=store, label=label)
    except BatchlabError:
        raise
    except Exception as e:  # failed before its loop started (nothing to store): a result too
        if on_error == "raise":
            raise
        return TrainResult(run_id=key[:12], key=key, config=cfg, status="failed", epochs=[],
                           final={}, error=f"{type(e).__name__}: {e}", exception=e)


def as_config(config: TrainConfig | dict[str, Any]) -> TrainConfig:
    return config if isinstance(config, TrainConfig) else make_config(**config)


def cached_result(store: Store, cfg: TrainConfig, key: str) -> TrainResult | None:
    """The finished run stored under `key`, as a result (`cached`), or None."""
    rec = store.finished(key)
    if rec is None:
        return None
    return TrainResult(run_id=rec.run_id, key=key, config=cfg, status=rec.status,
                       epochs=rec.epochs, final=rec.final, artifacts=rec.artifacts,
                       env=rec.env, wall_seconds=rec.wall_seconds or 0.0, cached=True)


def save_result(store: Store, result: TrainResult, label: str | None,
                t0: float | None = None) -> None:
    """Save a run and its checkpoints (safetensors files beside the store). `t0`, when
    given, sets `wall_seconds` to the time since it (after the files are written)."""
    artifacts = {}
    for epoch, state in result.checkpoints.items():
        path = store.artifacts_dir / result.run_id / f"epoch{epoch:04d}.safetensors"
        save_state(path, state, {"run_id": result.run_id, "epoch": epoch})
        artifacts[f"epoch{epoch:04d}"] = (str(path), sha256_file(path))
    result.artifacts = artifacts
    if t0 is not None:
        result.wall_seconds = time.perf_counter() - t0
    store.save_run(RunRecord(
        run_id=result.run_id, config_hash=result.key,
        config=result.config.model_dump(mode="json"), seed=result.config.seed,
        status=result.status, epochs=[clean(e) for e in result.epochs],
        final=clean(result.final), error=result.error, label=label,
        wall_seconds=result.wall_seconds, env=result.env, artifacts=artifacts,
    ))
