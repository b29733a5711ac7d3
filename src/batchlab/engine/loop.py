"""The training loop, once, for K >= 1 models: `train_one` is K = 1, a vectorized group
(`engine.vectorized.train_group`) is K > 1. How a step is computed is the stepper's job
(`engine/steppers.py`); everything else is here.

Per model, exactly as a run trained alone: its init (`cfg.seed`), its own shuffle stream
(`setup.shuffle_generator`), its lr schedule, its evaluation, probes and checkpoints, its
divergence and target checks. The models share only the batch-size schedule (one batch shape
per step). A model that diverges (non-finite loss) or reaches its target is recorded at that
epoch and leaves the stack; the others go on unaffected.

Hot-path rules: the dataset is resident on the device; batches are `index_select`s of seeded
`randperm`s; losses accumulate on the device and are read once per epoch (no host sync inside
the step loop); evaluation runs in large chunks under `no_grad`.

Probes see the weights at one point in every engine: `on_step(ctx, s, xb, yb)` runs after
step s's update (see `batchlab.probes`).

A crash inside the loop is a result, not a lost run: every model still training gets status
`failed` with the error (and `exception`), and nothing is retried. `ConfigError` and Ctrl-C
propagate.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from batchlab.config import TrainConfig, make_config
from batchlab.data import TensorData
from batchlab.engine import schedules
from batchlab.engine.result import Reporter, TrainResult
from batchlab.engine.setup import (
    build_model,
    check_batch_sizes,
    environment,
    get_data,
    resolve_device,
    run_key,
    shuffle_generator,
)
from batchlab.engine.steppers import Stepper, make_stepper
from batchlab.errors import ConfigError
from batchlab.measure.metrics import correct_bits, eval_metrics
from batchlab.probes import Probe, ProbeContext, make_probes
from batchlab.probes.geometry import snapshot

EpochHook = Callable[[dict[str, Any]], None]


def train_one(config: TrainConfig | dict[str, Any], *, probes: Sequence[Probe] | None = None,
              reporter: Reporter | None = None, model: nn.Module | None = None,
              data: TensorData | None = None, on_epoch: EpochHook | None = None) -> TrainResult:
    """Train one run (no store: see `batchlab.runs.training.train`). A crash inside training
    comes back as a `failed` result with `exception` set.

    `model`/`data` let callers (user factories, `recommend`) supply their own module and
    tensors; then the key also covers the module's initial weights.
    """
    cfg = config if isinstance(config, TrainConfig) else make_config(**config)
    device = resolve_device(cfg.device)
    td = data if data is not None else get_data(cfg, device)
    check_batch_sizes(cfg, td)
    probe_list = make_probes(cfg.probes) + list(probes or [])
    torch.manual_seed(cfg.seed)
    net = (model if model is not None else build_model(cfg, td)).to(device)
    key = run_key(cfg, td, net if model is not None or not cfg.builtin_model else None)
    return Loop([cfg], [net], td, device, [probe_list], [key], reporter=reporter,
                on_epoch=on_epoch).run()[0]


class Loop:
    """One pass over K models that share a batch-size schedule."""

    def __init__(self, cfgs: Sequence[TrainConfig], nets: Sequence[nn.Module], data: TensorData,
                 device: torch.device, probes: Sequence[Sequence[Probe]], keys: Sequence[str], *,
                 reporter: Reporter | None = None, on_epoch: EpochHook | None = None) -> None:
        self.cfgs, self.nets, self.td, self.device = list(cfgs), list(nets), data, device
        self.probes = [list(p) for p in probes]
        self.reporter, self.on_epoch = reporter, on_epoch
        self.K = len(self.cfgs)
        self.vectorized = self.K > 1
        self.stepper: Stepper = make_stepper(self.cfgs, self.nets, self.probes)
        env = environment(device)
        self.results = [
            TrainResult(run_id=k[:12], key=k, config=c, status="completed", epochs=[],
                        final={"engine": self.stepper.engine}, model=n, env=env)
            for c, n, k in zip(self.cfgs, self.nets, keys)
        ]
        self.ctxs: list[ProbeContext] = []
        self.step_probes: list[list[Probe]] = []
        self.own_seconds = [0.0] * self.K  # each run's share of the wall time
        self.train_seconds = [0.0] * self.K
        self.active = list(range(self.K))  # model indices still training, in stacked order

    # -- the pass ---------------------------------------------------------------------------
    def run(self) -> list[TrainResult]:
        try:
            self._train()
        except (ConfigError, KeyboardInterrupt):
            raise
        except Exception as e:  # a crash inside training is a result to keep, not to lose
            for k in self.active:
                res = self.results[k]
                res.status, res.error, res.exception = "failed", f"{type(e).__name__}: {e}", e
        for k, res in enumerate(self.results):
            if res.status != "failed":
                self._finish(k)
            res.wall_seconds = self.own_seconds[k]
        return self.results

    def _train(self) -> None:
        plans = [schedules.epoch_plan(c) for c in self.cfgs]
        if self.reporter:
            self.reporter.start(self.cfgs[0], len(plans[0]))
        for k in range(self.K):
            self._start(k)
        gens = [shuffle_generator(c.seed) for c in self.cfgs]
        const_lr = [schedules.constant_within_epoch(c) for c in self.cfgs]
        X, Y, n = self.td.x_train, self.td.y_train, self.td.n_train
        any_step_probes = any(self.step_probes)
        steps = samples = 0
        self._nets_in_train_mode()
        for e in range(len(plans[0])):
            if not self.active:
                break
            active = self.active
            bs = plans[active[0]][e].batch_size
            n_steps = math.ceil(n / bs)
            perms = torch.stack([torch.randperm(n, generator=gens[k]) for k in active])
            perms = perms.to(self.device)
            running = torch.zeros(len(active), device=self.device)
            report_every = max(1, n_steps // 50)
            lrs = [schedules.lr_at(self.cfgs[k], plans[k][e], 0, n_steps) for k in active]
            per_step_lr = not all(const_lr[k] for k in active)
            self._sync_device()
            t_ep = time.perf_counter()
            for s in range(n_steps):
                idx = perms[:, s * bs : (s + 1) * bs]
                b = idx.shape[1]
                flat = idx.reshape(-1)
                xb = X.index_select(0, flat).view(len(active), b, *X.shape[1:])
                yb = Y.index_select(0, flat).view(len(active), b)
                if per_step_lr:
                    lrs = [schedules.lr_at(self.cfgs[k], plans[k][e], s, n_steps) for k in active]
                running += self.stepper.step(xb, yb, lrs) * b
                steps += 1
                samples += b
                if any_step_probes:
                    self._on_step(steps, xb, yb)
                if self.reporter and (s + 1) % report_every == 0:
                    self.reporter.steps(s + 1, n_steps)
            self._sync_device()
            share = (time.perf_counter() - t_ep) / len(active)
            self.stepper.sync()
            keep = [j for j, k in enumerate(active)
                    if self._end_epoch(k, plans[k][e].epoch, bs, lrs[j], steps, samples, share,
                                       running[j] / n, len(active))]
            if len(keep) < len(active):
                self.active = [active[j] for j in keep]
                if keep:
                    self.stepper.keep(keep)
        if self.reporter:
            self.reporter.finish()

    # -- per model ----------------------------------------------------------------------------
    def _start(self, k: int) -> None:
        """Epoch 0: the initial state's metrics, the probes' start values, checkpoint 0."""
        net, res, cfg = self.nets[k], self.results[k], self.cfgs[k]
        t = time.perf_counter()
        res.init_state = snapshot(net)
        ctx = ProbeContext(model=net, init_state=res.init_state, config=cfg, data=self.td,
                           optimizer=self.stepper.optimizer)
        self.ctxs.append(ctx)
        row: dict[str, Any] = {"epoch": 0, "steps": 0, "samples": 0, "seconds": 0.0}
        row.update({key: float(v) for key, v in eval_metrics(net, self.td).items()})
        for p in self.probes[k]:
            row.update(p.on_start(ctx))
        # after on_start: a probe may set its cadence from the data (target_step does)
        self.step_probes.append([p for p in self.probes[k] if p.every_steps])
        row["eval_seconds"] = time.perf_counter() - t
        row["gap"] = row["train_acc"] - row["test_acc"]
        res.epochs.append(row)
        if 0 in cfg.checkpoint_epochs:
            res.checkpoints[0] = snapshot(net)
        self.own_seconds[k] += row["eval_seconds"]

    def _on_step(self, steps: int, xb: torch.Tensor, yb: torch.Tensor) -> None:
        """Step probes that are due, after this step's update, on their model's batch."""
        due = [(j, k, p) for j, k in enumerate(self.active) for p in self.step_probes[k]
               if p.every_steps and steps % p.every_steps == 0]
        if not due:
            return
        self.stepper.sync()
        for j, k, p in due:
            p.on_step(self.ctxs[k], steps, xb[j], yb[j])

    def _end_epoch(self, k: int, epoch: int, bs: int, lr: float, steps: int, samples: int,
                   seconds: float, running: torch.Tensor, k_active: int) -> bool:
        """Evaluate model k after an epoch; False when it stops (diverged or target reached)."""
        cfg, net, res = self.cfgs[k], self.nets[k], self.results[k]
        self.train_seconds[k] += seconds
        row: dict[str, Any] = {"epoch": epoch, "batch_size": bs, "lr": lr, "steps": steps,
                               "samples": samples, "seconds": seconds,
                               "train_seconds_total": self.train_seconds[k], "running_loss": None}
        if self.vectorized:
            row["vectorized_k"] = k_active
        t = time.perf_counter()
        mt = eval_metrics(net, self.td)
        vals = torch.stack([running, *mt.values()]).tolist()  # the epoch's one host sync
        row["running_loss"] = vals[0]
        row.update(dict(zip(mt.keys(), vals[1:])))
        for p in self.probes[k]:
            row.update(p.on_epoch_end(self.ctxs[k], epoch))
        row["gap"] = row["train_acc"] - row["test_acc"]
        row["eval_seconds"] = time.perf_counter() - t
        self.own_seconds[k] += seconds + row["eval_seconds"]
        res.epochs.append(row)
        if epoch in cfg.checkpoint_epochs:
            res.checkpoints[epoch] = snapshot(net)
        if self.reporter:
            self.reporter.epoch(row)
        if self.on_epoch:
            self.on_epoch(row)
        if not all(math.isfinite(row[m]) for m in ("running_loss", "train_loss")):
            res.status = "diverged"
            res.final["diverged_epoch"] = epoch
            return False
        if target_hit(cfg, row):
            res.final.update(target_epoch=epoch, target_steps=steps, target_samples=samples)
            return False
        return True

    def _finish(self, k: int) -> None:
        """The `final` summary: the last row's numbers, the best test accuracy, the status."""
        res, cfg = self.results[k], self.cfgs[k]
        last = res.epochs[-1]
        res.final.update({key: v for key, v in last.items() if isinstance(v, (int, float))})
        accs = [e["test_acc"] for e in res.epochs if isinstance(e.get("test_acc"), float)]
        res.final["best_test_acc"] = max((a for a in accs if math.isfinite(a)), default=None)
        res.final["train_seconds"] = self.train_seconds[k]
        res.final["status"] = res.status
        if self.vectorized:
            res.final["vectorized_k"] = self.K
        if cfg.target_metric is not None:
            res.final["target_reached"] = "target_epoch" in res.final
        if res.status == "completed" and "test" in self.td.eval_sets:
            # per-example correctness on the shared test set: paired accuracy intervals
            res.final["test_correct_bits"] = correct_bits(self.nets[k], *self.td.eval_sets["test"])

    def _nets_in_train_mode(self) -> None:
        for net in self.nets:
            net.train()

    def _sync_device(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


def target_hit(cfg: TrainConfig, row: dict[str, Any]) -> bool:
    """Whether an epoch row meets the config's target (loss: at most, accuracy: at least)."""
    if cfg.target_metric is None or row.get(cfg.target_metric) is None:
        return False
    v = row[cfg.target_metric]
    return v <= cfg.target_value if cfg.target_metric.endswith("loss") else v >= cfg.target_value
