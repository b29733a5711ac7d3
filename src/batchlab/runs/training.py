"""Train with a store: a finished run is looked up by its key instead of being recomputed,
and a new run (completed, diverged or failed) is saved with its safetensors checkpoints.

The engine (`batchlab.engine`) only computes results; this module decides what is stored.
`train` is `batchlab.train`; `train_many` trains a list of configs, vectorizing the groups
that `engine.vectorized.stack_groups` picks (it logs why any other config runs alone).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from batchlab.atomic import sha256_file
from batchlab.config import TrainConfig, make_config
from batchlab.data import TensorData, prepare
from batchlab.data.stream import StreamData, default_identity, is_source
from batchlab.data.tensors import flatten, raw_from_tensors
from batchlab.engine.continuation import Resume
from batchlab.engine.loop import EpochHook, train_one
from batchlab.engine.result import Reporter, TrainResult
from batchlab.engine.setup import build_model, check_batch_sizes, get_data, resolve_device, run_key
from batchlab.engine.vectorized import continue_runs, stack_groups, train_group
from batchlab.errors import BatchlabError, ConfigError
from batchlab.nn.checkpoint import save_state
from batchlab.nn.factory import as_log_probs, model_check_data
from batchlab.probes import Probe
from batchlab.runs.continuation import (
    STATE_ARTIFACT,
    KeepState,
    find_resume,
    in_call_prefixes,
    index_state,
    save_state_file,
    waves,
)
from batchlab.runs.store import RunRecord, Store
from batchlab.task import OBJECT_PREFIX, Data, Objective, loss_field, objective_for
from batchlab.usercode import check_finite_weights, check_model_on_data, user_data, user_error


def train(
    config: TrainConfig | dict[str, Any] | None = None,
    *,
    store: Store | str | Path | None = None,
    label: str | None = None,
    probes: list[Probe] | None = None,
    reporter: Reporter | None = None,
    model: nn.Module | Callable[[], nn.Module] | None = None,
    data: Any = None,
    on_epoch: EpochHook | None = None,
    loss: str | Objective | Callable[..., Any] | None = None,
    **fields: Any,
) -> TrainResult:
    """Train one run (`batchlab.train`). With a store, a finished run with the same key is
    returned from the store instead of being recomputed (`result.cached`), and a new run is
    saved atomically. A crash inside training is saved as a `failed` run, then raised.

        import batchlab
        res = batchlab.train(model=make_net, data=(X, y), loss="mse", batch_size=64, lr=0.01,
                             epochs=3)
        res.metric()          # the loss's metric on the test part (here: mse)

    `config`: a TrainConfig or a dict of its fields; `**fields` are TrainConfig fields too
    (they override `config`'s).
    `model`: an `nn.Module` (trained in place) or a factory returning one (called after torch
    is seeded with the run's seed); default: the config's model. With a classification loss
    given as `loss`, a LogSoftmax is appended (logits or log-probabilities both work).
    `data`: tensors `(X, y)` or `(X_train, y_train, X_test, y_test)` (kept resident), a
    map-style `Dataset`, an `IterableDataset` (streamed, never loaded whole), a factory
    `(batch_size, seed) -> batches`, a `batchlab.task.Data` naming train and test parts and
    an identity, or prepared `TensorData`/`StreamData`; default: the config's dataset.
    `loss`: "cross_entropy" (classification, the default), "mse", "next_token", a
    `batchlab.task.Objective` or a plain `loss(outputs, target)` function.
    The store key covers the config (with the loss's identity), the data's fingerprint and,
    for a model you pass, its initial weights.
    """
    objective = None if loss is None or isinstance(loss, str) else objective_for(loss)
    if config is None or fields or loss is not None:
        base = {} if config is None else as_config(config).model_dump()
        if loss is not None:
            fields["loss"] = loss_field(loss)
        config = make_config(**{**base, **fields})
    cfg = as_config(config)
    obj = objective if objective is not None else objective_for(
        None if cfg.loss.startswith(OBJECT_PREFIX) else cfg.loss)
    td = as_data(data, cfg, obj, builtin_model=model is None and cfg.builtin_model)
    net = model
    if model is not None and not isinstance(model, nn.Module):
        net = _model_from_factory(model, cfg, td, obj)
    elif model is not None and loss is not None and obj.log_probs:
        net = as_log_probs(model)
    res = _train_and_store(cfg, store=store, label=label, probes=probes, reporter=reporter,
                           model=net, data=td, on_epoch=on_epoch, objective=objective)
    if res.exception is not None:
        mine = model is not None or data is not None or loss is not None or _user_code(cfg)
        raise (user_error(res.exception) if mine else None) or res.exception
    return res


def _user_code(cfg: TrainConfig) -> bool:
    """Whether a run executes the user's code (a model, data or loss named module:function):
    only then is an exception from outside batchlab reported as the user's."""
    from batchlab.usercode import is_spec

    return not cfg.builtin_model or cfg.data is not None or is_spec(cfg.loss)


def _raise_failed(exc: BaseException, cfg: TrainConfig) -> None:
    raise (user_error(exc) if _user_code(cfg) else None) or exc


def as_data(data: Any, cfg: TrainConfig, objective: Objective, *, builtin_model: bool = False
            ) -> TensorData | StreamData | None:
    """Any data `train` accepts as TensorData (tensors, resident on the config's device) or
    StreamData (every other source); None stays None (the config's dataset)."""
    if data is None or isinstance(data, (TensorData, StreamData)):
        return data
    if isinstance(data, Data) and isinstance(data.train, (tuple, list)):
        data = (*data.train, *(data.test or ()))
    if isinstance(data, (tuple, list)):
        raw = raw_from_tensors(*user_data("data", objective, data), source="tensors",
                               classification=objective.accuracy)
        if builtin_model:
            raw = flatten(raw, builtin=True) if cfg.model == "mlp" else raw
        return prepare(raw, normalize=cfg.normalize, val_fraction=cfg.val_fraction,
                       max_train=cfg.max_train, max_test=cfg.max_test,
                       device=resolve_device(cfg.device))
    d = data if isinstance(data, Data) else Data(train=data)
    if not isinstance(d, Data) and not is_source(d):  # pragma: no cover - Data always is
        raise ConfigError(f"cannot train on {type(data).__name__}")
    ident = d.identity or default_identity(d.train)
    return StreamData(d.train, d.test, identity=ident, n_classes=d.n_classes,
                      max_train=cfg.max_train, max_test=cfg.max_test,
                      classification=objective.accuracy)


def _model_from_factory(factory: Callable[[], Any], cfg: TrainConfig, td: Any,
                        objective: Objective) -> nn.Module:
    """The factory's module, built after seeding torch with the run's seed and checked on two
    examples against the objective (LogSoftmax appended for classification)."""
    torch.manual_seed(cfg.seed)
    try:
        net = factory()
    except SystemExit as e:
        raise BatchlabError(f"the model factory called sys.exit({e.code!r}); it must return "
                            f"an nn.Module") from None
    if not isinstance(net, nn.Module):
        raise BatchlabError(f"the model factory returned {type(net).__name__}, not an nn.Module")
    check_finite_weights(net, "the model factory")
    if td is None:
        td = get_data(cfg, resolve_device(cfg.device), objective)
    x2, targets = model_check_data(td, objective.accuracy)
    check_model_on_data(net, x2, targets, objective)
    return as_log_probs(net) if objective.log_probs else net


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
        td = kw["data"] if kw.get("data") is not None else get_data(
            cfg, resolve_device(cfg.device), kw.get("objective"))
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
               on_done: Callable[[int], None] | None = None,
               keep_state: KeepState = False) -> list[TrainResult]:
    """Train `configs` (results in order), vectorizing the groups `stack_groups` picks and
    training the rest one by one. Runs already finished in `store` come back cached; new ones
    are saved exactly as `train()` saves them; a config listed twice is trained once.

    A crash inside training is saved as failed (a vectorized pass: every run it was training)
    and never retried; `on_error="raise"` then raises it, `"record"` returns the failed results
    and goes on (sweeps). A `BatchlabError` (bad input) always raises. `on_done(n)` is called
    as n more configs are done (progress).

    With a store, a run whose training is a prefix of another config's (`engine.continuation`)
    is continued instead of retrained: from a stored run that kept its state, or from a config
    of this same list (trained first, keeping its state). `keep_state` (True, or a predicate
    on the config): the runs trained here keep their state, for configs of a later call to
    continue (a search that lengthens its survivors)."""
    cfgs = [as_config(c) for c in configs]
    keys = [run_key(c, get_data(c, resolve_device(c.device))) for c in cfgs]
    results, first = stored_or_todo(store, cfgs, keys)
    todo = list(first.values())
    if on_done is not None:
        on_done(len(cfgs) - len(todo))
    after: dict[int, int] = {}
    if store is not None and todo:
        n_train = get_data(cfgs[todo[0]], resolve_device(cfgs[todo[0]].device)).n_train
        after = in_call_prefixes([cfgs[i] for i in todo], n_train or 0) if n_train else {}
    keep = {todo[j] for j in after.values()} | {
        i for i in todo if (keep_state(cfgs[i]) if callable(keep_state) else keep_state)}
    for wave in waves(len(todo), after):
        _train_wave([todo[j] for j in wave], cfgs, keys, results, store, label, on_error,
                    on_done, keep)
    return [results[k] for k in keys]


def _train_wave(todo: list[int], cfgs: list[TrainConfig], keys: list[str],
                results: dict[str, TrainResult], store: Store | None, label: str | None,
                on_error: str, on_done: Callable[[int], None] | None, keep: set[int]) -> None:
    """Train configs `todo` (indices into `cfgs`), none of which continues another of them:
    each from the longest stored prefix it has, else from scratch; passes as `stack_groups`
    cuts them, split further by the epoch their models start at."""
    resumes = {i: _resume_for(cfgs[i], store) for i in todo}
    for unit in stack_groups([cfgs[i] for i in todo]):
        by_start: dict[int, list[int]] = {}
        for j in unit:
            rs = resumes[todo[j]]
            by_start.setdefault(rs.state.epoch if rs is not None else 0, []).append(todo[j])
        for start, idxs in by_start.items():
            if start:
                _continue(idxs, cfgs, keys, results, resumes, store, label, on_error, keep)
                if on_done is not None:
                    on_done(len(idxs))
            else:
                _train_unit(idxs, cfgs, keys, results, store, label, on_error, on_done, keep)


def _resume_for(cfg: TrainConfig, store: Store | None) -> Resume | None:
    if store is None:
        return None
    td = get_data(cfg, resolve_device(cfg.device))
    if isinstance(td, StreamData):
        return None
    return find_resume(store, cfg, td)


def _continue(idxs: list[int], cfgs: list[TrainConfig], keys: list[str],
              results: dict[str, TrainResult], resumes: dict[int, Resume | None],
              store: Store | None, label: str | None, on_error: str, keep: set[int]) -> None:
    """Continue configs from their prefixes' states, in one pass (they share a start epoch
    and a `stack_groups` unit)."""
    t0 = time.perf_counter()
    td = get_data(cfgs[idxs[0]], resolve_device(cfgs[idxs[0]].device))
    group = continue_runs([cfgs[i] for i in idxs], [resumes[i] for i in idxs],  # type: ignore[misc]
                          [keys[i] for i in idxs], td, keep_state=[i in keep for i in idxs])
    for i, res in zip(idxs, group):
        if len(idxs) == 1:
            res.wall_seconds = time.perf_counter() - t0
        if store is not None:
            save_result(store, res, label)
        results[keys[i]] = res
    failed = next((r.exception for r in group if r.exception is not None), None)
    if failed is not None and (on_error == "raise" or isinstance(failed, BatchlabError)):
        _raise_failed(failed, cfgs[idxs[0]])


def _train_unit(idxs: list[int], cfgs: list[TrainConfig], keys: list[str],
                results: dict[str, TrainResult], store: Store | None, label: str | None,
                on_error: str, on_done: Callable[[int], None] | None, keep: set[int]) -> None:
    """Train configs from scratch: one vectorized pass for >= 2, else `train()`'s path."""
    if len(idxs) >= 2 and isinstance(get_data(cfgs[idxs[0]], resolve_device(cfgs[idxs[0]].device)),
                                     StreamData):
        for i in idxs:  # streamed data trains one run at a time (autograd)
            results[keys[i]] = _train_alone(cfgs[i], keys[i], store, label, on_error)
            exc = results[keys[i]].exception
            if exc is not None and (on_error == "raise" or isinstance(exc, BatchlabError)):
                _raise_failed(exc, cfgs[i])
        if on_done is not None:
            on_done(len(idxs))
        return
    if len(idxs) >= 2:
        group = train_group([cfgs[i] for i in idxs],
                            get_data(cfgs[idxs[0]], resolve_device(cfgs[idxs[0]].device)),
                            keep_state=[i in keep for i in idxs])
        if store is not None:
            for res in group:
                save_result(store, res, label)
    else:
        group = [_train_alone(cfgs[idxs[0]], keys[idxs[0]], store, label, on_error,
                              idxs[0] in keep)]
    for i, res in zip(idxs, group):
        results[keys[i]] = res
    failed = next((r.exception for r in group if r.exception is not None), None)
    if failed is not None and (on_error == "raise" or isinstance(failed, BatchlabError)):
        _raise_failed(failed, cfgs[idxs[0]])
    if on_done is not None:
        on_done(len(idxs))


def _train_alone(cfg: TrainConfig, key: str, store: Store | None, label: str | None,
                 on_error: str, keep_state: KeepState = False) -> TrainResult:
    try:
        return _train_and_store(cfg, store=store, label=label,
                                **({"keep_state": True} if keep_state else {}))
    except BatchlabError:
        raise
    except Exception as e:  # failed before its loop started (nothing to store): a result too
        if on_error == "raise":
            raise
        return TrainResult(run_id=key[:12], key=key, config=cfg, status="failed", epochs=[],
                           final={}, error=f"{type(e).__name__}: {e}", exception=e)


def as_config(config: TrainConfig | dict[str, Any]) -> TrainConfig:
    return config if isinstance(config, TrainConfig) else make_config(**config)


def stored_or_todo(store: Store | None, cfgs: Sequence[TrainConfig], keys: Sequence[str]
                   ) -> tuple[dict[str, TrainResult], dict[str, int]]:
    """Each distinct key once (a config listed twice trains once): the finished run the store
    holds under it, as a cached result, or else the index of its first config, to train (in
    the configs' order). Both executors start a list of configs here."""
    stored: dict[str, TrainResult] = {}
    todo: dict[str, int] = {}
    for i, (cfg, key) in enumerate(zip(cfgs, keys, strict=True)):
        if key in stored or key in todo:
            continue
        cached = cached_result(store, cfg, key) if store is not None else None
        if cached is not None:
            stored[key] = cached
        else:
            todo[key] = i
    return stored, todo


def cached_result(store: Store, cfg: TrainConfig, key: str) -> TrainResult | None:
    """The finished run stored under `key`, as a result (`cached`), or None."""
    rec = store.finished(key)
    if rec is None:
        return None
    return TrainResult(run_id=rec.run_id, key=key, config=cfg, status=rec.status,
                       epochs=rec.epochs, final=rec.final, artifacts=rec.artifacts,
                       env=rec.env, wall_seconds=rec.wall_seconds or 0.0, cached=True)


def load_model(res: TrainResult, epoch: int) -> nn.Module:
    """A fresh model of the run's config holding the run's weights at `epoch` (from memory, or
    from the store's checkpoint file for a cached run), on the device of the run's data: how
    experiments measure a run after it trained, the same way everywhere."""
    cfg = res.config
    td = get_data(cfg, resolve_device(cfg.device))
    model = build_model(cfg, td).to(td.x_train.device)
    model.load_state_dict(res.checkpoint(epoch))
    return model


def save_result(store: Store, result: TrainResult, label: str | None,
                t0: float | None = None) -> None:
    """Save a run and its checkpoints (safetensors files beside the store). `t0`, when
    given, sets `wall_seconds` to the time since it (after the files are written)."""
    artifacts = {}
    for epoch, state in result.checkpoints.items():
        path = store.artifacts_dir / result.run_id / f"epoch{epoch:04d}.safetensors"
        save_state(path, state, {"run_id": result.run_id, "epoch": epoch})
        artifacts[f"epoch{epoch:04d}"] = (str(path), sha256_file(path))
    kept = save_state_file(store, result)  # the end state a longer run continues from
    if kept is not None:
        artifacts[STATE_ARTIFACT] = kept
    result.artifacts = artifacts
    if t0 is not None:
        result.wall_seconds = time.perf_counter() - t0
    store.save_run(RunRecord(
        run_id=result.run_id, config_hash=result.key,
        config=result.config.model_dump(mode="json"), seed=result.config.seed,
        status=result.status, epochs=result.epochs,
        final=result.final, error=result.error, label=label,
        wall_seconds=result.wall_seconds, env=result.env, artifacts=artifacts,
    ))
    if kept is not None:
        index_state(store, result, get_data(result.config, resolve_device(result.config.device)).fingerprint)
