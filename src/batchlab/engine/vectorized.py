"""Vectorized runs: several configurations that share a batch-size schedule trained in one pass.

Why: at small batch sizes one step of the MLP is a few skinny matmuls ([B, 1024] x [1024, 1024])
that leave the cores partly idle and re-read every weight from memory per step. Stacking K models
(seeds, learning rates, inits, lr schedules) into `FusedMLPSGD` turns every layer into one `bmm`
over K independent problems, which keeps both cores busy. Each model keeps its own init
(`build_model`), its own shuffle stream (`_shuffle_generator(seed)`) and its own per-step lr, so a
vectorized run equals the sequential `train()` of the same config up to float rounding, and it is
stored under the same key with the same record layout (a later `train()` finds it cached).

When to vectorize (`plan_groups`) — the rule, from measurements on the 2-core CPU (see
`benchmarks/vectorized.py`): configs are grouped when they can share a pass (`group_key`), and
a group of K >= 2 is vectorized only when every batch size in its schedule is at most
`MAX_VECTORIZED_BATCH`; larger batches already saturate the matmul units one model at a time, so
there the runs go one after another through `train()`. Groups are cut into chunks of at most
`MAX_K` models (K = 8 measured slower per sample than K = 4).

A model that diverges (non-finite loss) or reaches its target is recorded at that epoch and
dropped from the stack, so it never affects the others (the bmm problems are independent anyway).
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from batchlab.config import TrainConfig
from batchlab.data import TensorData
from batchlab.engine import schedules
from batchlab.engine.fused import FusedMLPSGD
from batchlab.engine.train import (
    TrainResult,
    _metrics,
    _save,
    _shuffle_generator,
    _target_hit,
    build_model,
    environment,
    get_data,
    resolve_device,
    train,
)
from batchlab.errors import BatchlabError, ConfigError
from batchlab.nn.models import MLP
from batchlab.probes import Probe, ProbeContext, make_probes
from batchlab.probes.geometry import snapshot
from batchlab.runs.store import Store

MAX_VECTORIZED_BATCH = 128
"""Largest batch size vectorized. Measured (2-core CPU, lightly loaded): at batch 64 one model
runs at 84% of the matmul roofline and K = 2..4 stacked models at 94-96% (1.12-1.14x); from
batch 256 on a single model already runs at ~100% of the roofline (fused.py), so stacking has
nothing left to gain there; on one thread, stacking 4 models gained nothing at 64 or 256
(0.98-0.99x) and lost at 1024 (0.81x: the stacked activations leave the cache). 128 is the
conservative cut; re-check it with `benchmarks/vectorized.py` (its rule table) when quiet."""
MAX_K = 4
"""Models per pass: K = 2 and 4 measured equally good at batch 64, K = 8 slower per sample."""


# -- grouping ---------------------------------------------------------------------------------
def group_key(cfg: TrainConfig) -> tuple[Any, ...] | None:
    """What configs must share to be trained in one pass, or None when `cfg` cannot be
    vectorized (not fused-eligible SGD, or a probe that needs per-step hooks)."""
    if (
        cfg.optimizer != "sgd"
        or cfg.model != "mlp"
        or cfg.batchnorm
        or cfg.discard_fraction > 0
        or cfg.engine == "autograd"
    ):
        return None
    try:
        probes = make_probes(cfg.probes)
    except ConfigError:
        return None
    if any(p.every_steps or p.needs_grad for p in probes):
        return None
    return (
        cfg.dataset, cfg.data_dir, cfg.normalize, cfg.val_fraction, cfg.max_train, cfg.max_test,
        tuple(cfg.hidden), cfg.momentum, cfg.nesterov, cfg.weight_decay,
        tuple(e.batch_size for e in schedules.epoch_plan(cfg)), cfg.device,
    )


def worth_vectorizing(cfg: TrainConfig, k: int) -> bool:
    """The measured rule: K >= 2 and every batch size <= MAX_VECTORIZED_BATCH."""
    return k >= 2 and cfg.epochs > 0 and max(cfg.batch_sizes()) <= MAX_VECTORIZED_BATCH


def plan_groups(configs: Sequence[TrainConfig]) -> list[list[int]]:
    """Indices of `configs` cut into work units, in first-appearance order: a unit of >= 2 is
    trained in one vectorized pass, a unit of 1 by `train()`."""
    by_key: dict[tuple[Any, ...], list[int]] = {}
    units: list[list[int]] = []
    for i, cfg in enumerate(configs):
        key = group_key(cfg)
        if key is None:
            units.append([i])
            continue
        if key not in by_key:
            by_key[key] = []
            units.append(by_key[key])
        by_key[key].append(i)
    out: list[list[int]] = []
    for unit in units:
        if len(unit) >= 2 and worth_vectorizing(configs[unit[0]], len(unit)):
            chunks = [unit[j : j + MAX_K] for j in range(0, len(unit), MAX_K)]
            for c in chunks:
                out.extend([c] if len(c) >= 2 else [[i] for i in c])
        else:
            out.extend([i] for i in unit)
    return out


# -- public API -------------------------------------------------------------------------------
def train_many(configs: Sequence[TrainConfig | dict[str, Any]], store: Store | None = None,
               label: str | None = None) -> list[TrainResult]:
    """Train `configs` (results in order), vectorizing the groups `plan_groups` picks and running
    the rest through `train()`. Runs already finished in `store` come back cached; new ones are
    saved exactly as `train()` saves them; a config listed twice is trained once. If a
    vectorized pass crashes, its configs are re-run one by one through `train()` (which records
    a failure as it always does)."""
    from batchlab.config import make_config

    cfgs = [c if isinstance(c, TrainConfig) else make_config(**c) for c in configs]
    keys = [c.key(get_data(c, resolve_device(c.device)).fingerprint) for c in cfgs]
    results: list[TrainResult | None] = [None] * len(cfgs)
    first: dict[str, int] = {}
    todo: list[int] = []
    for i, key in enumerate(keys):
        if key in first:
            continue
        first[key] = i
        if store is not None and store.finished(key) is not None:
            results[i] = train(cfgs[i], store=store, label=label)  # returns the stored run
        else:
            todo.append(i)
    for unit in plan_groups([cfgs[i] for i in todo]):
        idxs = [todo[j] for j in unit]
        group: list[TrainResult] | None = None
        if len(idxs) >= 2:
            try:
                td = get_data(cfgs[idxs[0]], resolve_device(cfgs[idxs[0]].device))
                group = train_group([cfgs[i] for i in idxs], td, store=store, label=label)
            except BatchlabError:
                raise
            except Exception:
                group = None
        if group is None:
            group = [train(cfgs[i], store=store, label=label) for i in idxs]
        for i, res in zip(idxs, group):
            results[i] = res
    return [r if r is not None else results[first[k]] for r, k in zip(results, keys)]


def train_group(configs: Sequence[TrainConfig], data: TensorData, *, store: Store | None = None,
                label: str | None = None) -> list[TrainResult]:
    """Train configs that share a `group_key` together in one pass over `data` (no cache
    lookup; with `store`, each finished run is saved as `train()` would save it)."""
    if not configs:
        return []
    keys = {group_key(c) for c in configs}
    if None in keys or len(keys) != 1:
        raise BatchlabError("train_group needs fused-eligible SGD configs that share data, "
                            "model shape, optimizer settings and batch-size schedule")
    for bs in configs[0].batch_sizes():
        if bs > data.n_train:
            raise ConfigError(f"batch size {bs} is larger than the training set ({data.n_train})")
    device = resolve_device(configs[0].device)
    return _Pass(list(configs), data, device).run(store, label)


# -- the pass ---------------------------------------------------------------------------------
class _Pass:
    """One vectorized pass: K modules (for eval, probes, checkpoints and results), one stacked
    `FusedMLPSGD` over the models still training."""

    def __init__(self, configs: list[TrainConfig], td: TensorData, device: torch.device) -> None:
        self.cfgs, self.td, self.device = configs, td, device
        self.nets: list[nn.Module] = [build_model(c, td).to(device) for c in configs]
        if not all(isinstance(n, MLP) for n in self.nets):
            raise BatchlabError("vectorized training needs MLP models")
        self.probes: list[list[Probe]] = [make_probes(c.probes) for c in configs]
        env = environment(device)
        self.results = [
            TrainResult(run_id=(k := c.key(td.fingerprint))[:12], key=k, config=c,
                        status="completed", epochs=[], final={"engine": "fused"}, model=n,
                        env=env)
            for c, n in zip(configs, self.nets)
        ]
        self.ctxs: list[ProbeContext] = []
        self.own_seconds = [0.0] * len(configs)  # each run's share of the wall time

    def run(self, store: Store | None, label: str | None) -> list[TrainResult]:
        K = len(self.cfgs)
        for k in range(K):
            self._start(k)
        c0 = self.cfgs[0]
        stepper = FusedMLPSGD.from_mlps(self.nets, momentum=c0.momentum, nesterov=c0.nesterov,
                                        weight_decay=c0.weight_decay)
        active = list(range(K))  # model indices still training, in stacked order
        plans = [schedules.epoch_plan(c) for c in self.cfgs]
        gens = [_shuffle_generator(c.seed) for c in self.cfgs]
        const_lr = [schedules.constant_within_epoch(c) for c in self.cfgs]
        X, Y, n = self.td.x_train, self.td.y_train, self.td.n_train
        steps = samples = 0
        train_seconds = [0.0] * K
        for e in range(len(plans[0])):
            if not active:
                break
            bs = plans[0][e].batch_size
            n_steps = math.ceil(n / bs)
            perms = torch.stack([torch.randperm(n, generator=gens[k]) for k in active])
            perms = perms.to(self.device)
            running = torch.zeros(len(active), device=self.device)
            lr_vals = [schedules.lr_at(self.cfgs[k], plans[k][e], 0, n_steps) for k in active]
            lr = torch.tensor(lr_vals, dtype=X.dtype, device=self.device)
            per_step = not all(const_lr[k] for k in active)
            self._sync()
            t_ep = time.perf_counter()
            for s in range(n_steps):
                idx = perms[:, s * bs : (s + 1) * bs]
                b = idx.shape[1]
                flat = idx.reshape(-1)
                xb = X.index_select(0, flat).view(len(active), b, -1)
                yb = Y.index_select(0, flat).view(len(active), b)
                if per_step:
                    lr_vals = [schedules.lr_at(self.cfgs[k], plans[k][e], s, n_steps)
                               for k in active]
                    lr = torch.tensor(lr_vals, dtype=X.dtype, device=self.device)
                running += stepper.step(xb, yb, lr) * b
                steps += 1
                samples += b
            self._sync()
            share = (time.perf_counter() - t_ep) / len(active)
            stepper.write_back([self.nets[k] for k in active])
            running_vals = (running / n).tolist()
            keep: list[int] = []
            for j, k in enumerate(active):
                train_seconds[k] += share
                row = {"epoch": plans[k][e].epoch, "batch_size": bs, "lr": lr_vals[j],
                       "steps": steps, "samples": samples, "seconds": share,
                       "train_seconds_total": train_seconds[k],
                       "running_loss": running_vals[j], "vectorized_k": len(active)}
                self.own_seconds[k] += share
                if self._end_epoch(k, row, steps, samples):
                    keep.append(j)
            if len(keep) < len(active):
                stepper = _subset(stepper, keep)
                active = [active[j] for j in keep]
        out = []
        for k, res in enumerate(self.results):
            self._finish(k, train_seconds[k])
            if store is not None:
                _save(store, res, label, time.perf_counter() - self.own_seconds[k])
            else:
                res.wall_seconds = self.own_seconds[k]
            out.append(res)
        return out

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _start(self, k: int) -> None:
        """Epoch 0 of model k, as `train()` records it."""
        net, res = self.nets[k], self.results[k]
        t = time.perf_counter()
        res.init_state = snapshot(net)
        ctx = ProbeContext(model=net, init_state=res.init_state, config=self.cfgs[k],
                           data=self.td, optimizer=None)
        self.ctxs.append(ctx)
        row: dict[str, Any] = {"epoch": 0, "steps": 0, "samples": 0, "seconds": 0.0}
        row.update({key: float(v) for key, v in _metrics(net, self.td).items()})
        for p in self.probes[k]:
            row.update(p.on_start(ctx))
        row["eval_seconds"] = time.perf_counter() - t
        row["gap"] = row["train_acc"] - row["test_acc"]
        res.epochs.append(row)
        if 0 in self.cfgs[k].checkpoint_epochs:
            res.checkpoints[0] = snapshot(net)
        self.own_seconds[k] += row["eval_seconds"]

    def _end_epoch(self, k: int, row: dict[str, Any], steps: int, samples: int) -> bool:
        """Evaluate model k after an epoch; False when it stops (diverged or target reached)."""
        cfg, net, res = self.cfgs[k], self.nets[k], self.results[k]
        t = time.perf_counter()
        mt = _metrics(net, self.td)
        row.update(dict(zip(mt.keys(), torch.stack(list(mt.values())).tolist())))
        for p in self.probes[k]:
            row.update(p.on_epoch_end(self.ctxs[k], row["epoch"]))
        row["gap"] = row["train_acc"] - row["test_acc"]
        row["eval_seconds"] = time.perf_counter() - t
        self.own_seconds[k] += row["eval_seconds"]
        res.epochs.append(row)
        if row["epoch"] in cfg.checkpoint_epochs:
            res.checkpoints[row["epoch"]] = snapshot(net)
        if not all(math.isfinite(row[m]) for m in ("running_loss", "train_loss")):
            res.status = "diverged"
            res.final["diverged_epoch"] = row["epoch"]
            return False
        if _target_hit(cfg, row):
            res.final.update(target_epoch=row["epoch"], target_steps=steps,
                             target_samples=samples)
            return False
        return True

    def _finish(self, k: int, train_seconds: float) -> None:
        """The `final` summary, built exactly as `train()` builds it."""
        res, cfg = self.results[k], self.cfgs[k]
        last = res.epochs[-1]
        res.final.update({key: v for key, v in last.items() if isinstance(v, (int, float))})
        accs = [e["test_acc"] for e in res.epochs if isinstance(e.get("test_acc"), float)]
        res.final["best_test_acc"] = max((a for a in accs if math.isfinite(a)), default=None)
        res.final["train_seconds"] = train_seconds
        res.final["status"] = res.status
        res.final["vectorized_k"] = len(self.cfgs)
        if cfg.target_metric is not None:
            res.final["target_reached"] = "target_epoch" in res.final


def _subset(stepper: FusedMLPSGD, keep: list[int]) -> FusedMLPSGD:
    """A stepper over the models at stacked positions `keep`, momentum buffers included."""
    sel = torch.tensor(keep, device=stepper.W[0].device)
    new = FusedMLPSGD([w.index_select(0, sel) for w in stepper.W],
                      [b.index_select(0, sel) for b in stepper.b], momentum=stepper.momentum,
                      nesterov=stepper.nesterov, weight_decay=stepper.weight_decay)
    for i, (bw, bb) in enumerate(zip(stepper._buf_W, stepper._buf_b)):
        if bw is not None:
            new._buf_W[i], new._buf_b[i] = bw.index_select(0, sel), bb.index_select(0, sel)
    return new
