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
the step loop); evaluation runs in large chunks under `no_grad`. Streamed data
(`batchlab.data.stream`: a Dataset, IterableDataset or loader factory) is the other path: K = 1
on autograd, one batch at a time moved to the device, never held whole.

What is learned is the run's objective (`batchlab.task`: the config's `loss`, or a Python object
passed in): rows hold `{set}_loss` and `{set}_{metric}` (`_acc` for classification), `gap` is how
much better the metric is on train than on test, and `final` names the metric.

Probes see the weights at one point in every engine: `on_step(ctx, s, xb, yb)` runs after
step s's update (see `batchlab.probes`).

A run may continue a shorter run that is its prefix (`engine.continuation`): `resume` starts
after it from its `State`; `keep_state` keeps a full-length run's end state (`res.state`).

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
from batchlab.engine import schedules
from batchlab.engine.continuation import Resume, capture, restore_stepper
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
from batchlab.engine.steppers import AutogradStepper, Stepper, make_stepper
from batchlab.errors import BatchlabError, ConfigError
from batchlab.measure.metrics import correct_bits, eval_metrics
from batchlab.probes import Probe, ProbeContext, make_probes
from batchlab.probes.geometry import snapshot
from batchlab.task import Objective, objective_for, resolve_target

EpochHook = Callable[[dict[str, Any]], None]


def train_one(config: TrainConfig | dict[str, Any], *, probes: Sequence[Probe] | None = None,
              reporter: Reporter | None = None, model: nn.Module | None = None,
              data: Any = None, on_epoch: EpochHook | None = None,
              objective: Objective | None = None, keep_state: bool = False) -> TrainResult:
    """Train one run (no store: see `batchlab.runs.training.train`). A crash inside training
    comes back as a `failed` result with `exception` set.

    `model`/`data` let callers (user factories, `recommend`) supply their own module and
    data (TensorData or StreamData); then the key also covers the module's initial weights.
    `objective`: a loss given as a Python object (`cfg.loss` records its identity).
    `keep_state`: keep the run's state at its end (`res.state`) when it trains its whole
    length, for a longer run to continue from (`engine.continuation`).
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
                on_epoch=on_epoch, objective=objective, keep_state=[keep_state]).run()[0]


class Loop:
    """One pass over K models that share a batch-size schedule."""

    def __init__(self, cfgs: Sequence[TrainConfig], nets: Sequence[nn.Module], data: Any,
                 device: torch.device, probes: Sequence[Sequence[Probe]], keys: Sequence[str], *,
                 reporter: Reporter | None = None, on_epoch: EpochHook | None = None,
                 objective: Objective | None = None, resume: Sequence[Resume | None] | None = None,
                 keep_state: Sequence[bool] | None = None) -> None:
        self.cfgs, self.nets, self.td, self.device = list(cfgs), list(nets), data, device
        self.resume = list(resume) if resume is not None else [None] * len(self.cfgs)
        if len({r.state.epoch if r is not None else 0 for r in self.resume}) > 1:
            raise BatchlabError("the models of one pass must start at the same epoch")
        self.keep_state = list(keep_state) if keep_state is not None else [False] * len(self.cfgs)
        self.probes = [list(p) for p in probes]
        self.reporter, self.on_epoch = reporter, on_epoch
        self.K = len(self.cfgs)
        self.vectorized = self.K > 1
        self.streamed = bool(getattr(data, "streamed", False))
        self.objective = objective if objective is not None else objective_for(self.cfgs[0].loss)
        # classification on resident tensors keeps the study's evaluation path exactly
        self.eval_objective = None if (not self.streamed and objective is None
                                       and self.cfgs[0].loss == "cross_entropy") else self.objective
        self.target = [resolve_target(c, self.objective) for c in self.cfgs]
        self.stepper: Stepper = make_stepper(self.cfgs, self.nets, self.probes, objective=objective,
                                             streamed=self.streamed)
        env = environment(device)
        metric = {"engine": self.stepper.engine, "loss": self.objective.name,
                  "metric": self.objective.metric_name,
                  "metric_higher_is_better": self.objective.higher_is_better}
        if self.cfgs[0].amp != "off":
            metric["amp"] = self.cfgs[0].amp
        self.results = [
            TrainResult(run_id=k[:12], key=k, config=c, status="completed", epochs=[],
                        final=dict(metric), model=n, env=env)
            for c, n, k in zip(self.cfgs, self.nets, keys)
        ]
        self.ctxs: list[ProbeContext] = []
        self.step_probes: list[list[Probe]] = []
        self.own_seconds = [0.0] * self.K  # each run's share of the wall time
        self.train_seconds = [0.0] * self.K
        self.active = list(range(self.K))  # model indices still training, in stacked order
        self.gens = [shuffle_generator(c.seed) for c in self.cfgs]
        if self.resume[0] is not None:  # the weights are in the modules already
            restore_stepper(self.stepper, [r.state for r in self.resume if r is not None], self.K)

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
        settings = [schedules.epoch_settings(c) for c in self.cfgs]
        if self.reporter:
            self.reporter.start(self.cfgs[0], len(settings[0]))
        for k in range(self.K):
            self._start(k)
        gens = self.gens
        first = self.resume[0].state if self.resume[0] is not None else None
        const_lr = [schedules.constant_within_epoch(c) for c in self.cfgs]
        if self.streamed:
            self._train_streamed(settings[0], gens[0], const_lr[0])
            if self.reporter:
                self.reporter.finish()
            return
        X, Y, n = self.td.x_train, self.td.y_train, self.td.n_train
        any_step_probes = any(self.step_probes)
        steps, samples = (first.steps, first.samples) if first is not None else (0, 0)
        self._nets_in_train_mode()
        for e in range(first.epoch if first is not None else 0, len(settings[0])):
            if not self.active:
                break
            active = self.active
            bs = settings[active[0]][e].batch_size
            n_steps = math.ceil(n / bs)
            perms = torch.stack([torch.randperm(n, generator=gens[k]) for k in active])
            perms = perms.to(self.device)
            running = torch.zeros(len(active), device=self.device)
            report_every = max(1, n_steps // 50)
            lrs = [schedules.lr_at(self.cfgs[k], settings[k][e], 0, n_steps) for k in active]
            per_step_lr = not all(const_lr[k] for k in active)
            self._sync_device()
            t_ep = time.perf_counter()
            for s in range(n_steps):
                idx = perms[:, s * bs : (s + 1) * bs]
                b = idx.shape[1]
                flat = idx.reshape(-1)
                xb = X.index_select(0, flat).view(len(active), b, *X.shape[1:])
                yb = Y.index_select(0, flat).view(len(active), b, *Y.shape[1:])
                if per_step_lr:
                    lrs = [schedules.lr_at(self.cfgs[k], settings[k][e], s, n_steps) for k in active]
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
                    if self._end_epoch(k, settings[k][e].epoch, bs, lrs[j], steps, samples, share,
                                       running[j] / n, len(active))]
            if len(keep) < len(active):
                self.active = [active[j] for j in keep]
                if keep:
                    self.stepper.keep(keep)
        if self.reporter:
            self.reporter.finish()

    def _train_streamed(self, settings: list[schedules.EpochSetting], gen: torch.Generator, const_lr: bool) -> None:
        """The epochs of one model on streamed data: batches as the source yields them (see
        `batchlab.data.stream`), moved to the device one at a time."""
        cfg, steps, samples = self.cfgs[0], 0, 0
        self._nets_in_train_mode()
        for ep in settings:
            if not self.active:
                break
            bs = ep.batch_size
            n_steps = self.td.steps_per_epoch(bs)
            if not const_lr and n_steps is None:
                raise ConfigError("an lr that changes within an epoch (warmup, cosine) needs a "
                                  "data set of known length: give the IterableDataset a __len__")
            lr = schedules.lr_at(cfg, ep, 0, n_steps or 1)
            running = torch.zeros(1, device=self.device)
            seen = 0
            report_every = max(1, (n_steps or 50) // 50)
            self._sync_device()
            t_ep = time.perf_counter()
            for s, (xb, yb) in enumerate(self.td.train_batches(bs, gen, ep.epoch)):
                xb = xb.to(self.device, non_blocking=True).unsqueeze(0)
                yb = yb.to(self.device, non_blocking=True).unsqueeze(0)
                b = xb.shape[1]
                if not const_lr:
                    lr = schedules.lr_at(cfg, ep, s, n_steps or 1)
                running += self.stepper.step(xb, yb, [lr]) * b
                steps += 1
                samples += b
                seen += b
                if self.step_probes[0]:
                    self._on_step(steps, xb, yb)
                if self.reporter and (s + 1) % report_every == 0:
                    self.reporter.steps(s + 1, n_steps or s + 1)
            if not seen:
                raise ConfigError("the training data yielded no batches in an epoch")
            self._sync_device()
            share = time.perf_counter() - t_ep
            if not self._end_epoch(0, ep.epoch, bs, lr, steps, samples, share, running[0] / seen, 1):
                self.active = []

    # -- per model ----------------------------------------------------------------------------
    def _start(self, k: int) -> None:
        """Epoch 0: the initial state's metrics, the probes' start values, checkpoint 0."""
        net, res, cfg = self.nets[k], self.results[k], self.cfgs[k]
        if self.resume[k] is not None:
            return self._start_continued(k)
        t = time.perf_counter()
        res.init_state = snapshot(net)
        ctx = ProbeContext(model=net, init_state=res.init_state, config=cfg, data=self.td,
                           optimizer=self.stepper.optimizer, objective=self.objective)
        self.ctxs.append(ctx)
        row: dict[str, Any] = {"epoch": 0, "steps": 0, "samples": 0, "seconds": 0.0}
        row.update({key: float(v) for key, v in eval_metrics(net, self.td, self.eval_objective).items()})
        for p in self.probes[k]:
            row.update(p.on_start(ctx))
        # after on_start: a probe may set its cadence from the data (target_step does)
        self.step_probes.append([p for p in self.probes[k] if p.every_steps])
        row["eval_seconds"] = time.perf_counter() - t
        row["gap"] = self._gap(row)
        res.epochs.append(row)
        if 0 in cfg.checkpoint_epochs:
            res.checkpoints[0] = snapshot(net)
        self.own_seconds[k] += row["eval_seconds"]

    def _start_continued(self, k: int) -> None:
        """A continued run: the prefix's rows, checkpoints, counters and probe states instead
        of epoch 0 (the init weights were kept by the caller before it loaded the prefix's)."""
        rs, net, res = self.resume[k], self.nets[k], self.results[k]
        assert rs is not None
        res.init_state = rs.init_state
        ctx = ProbeContext(model=net, init_state=rs.init_state, config=self.cfgs[k], data=self.td,
                           optimizer=self.stepper.optimizer, objective=self.objective)
        self.ctxs.append(ctx)
        for p, saved in zip(self.probes[k], rs.state.probes, strict=True):
            p.on_start(ctx)  # what it sets up from the data, then its state at the prefix's end
            p.load_state(saved)
        self.step_probes.append([p for p in self.probes[k] if p.every_steps])
        res.epochs.extend(dict(r) for r in rs.rows)
        res.checkpoints.update(rs.checkpoints)
        res.env = {**res.env, "continued_from": rs.source}  # provenance; the record is the same
        self.train_seconds[k] = rs.state.train_seconds
        self.gens[k].set_state(rs.state.generator.clone())
        if isinstance(self.stepper, AutogradStepper):
            self.stepper.steps = rs.state.steps

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
        # a run with eval_every > 1 skips the metrics between evaluations (`evaluates`)
        mt = eval_metrics(net, self.td, self.eval_objective) if cfg.evaluates(epoch) else {}
        vals = torch.stack([running, *mt.values()]).tolist()  # the epoch's one host sync
        row["running_loss"] = vals[0]
        row.update(dict(zip(mt.keys(), vals[1:])))
        for p in self.probes[k]:
            row.update(p.on_epoch_end(self.ctxs[k], epoch))
        row["gap"] = self._gap(row) if mt else None
        row["eval_seconds"] = time.perf_counter() - t
        self.own_seconds[k] += seconds + row["eval_seconds"]
        res.epochs.append(row)
        if epoch in cfg.checkpoint_epochs:
            res.checkpoints[epoch] = snapshot(net)
        if self.reporter:
            self.reporter.epoch(row)
        if self.on_epoch:
            self.on_epoch(row)
        if not all(math.isfinite(row[m]) for m in ("running_loss", "train_loss") if m in row):
            res.status = "diverged"
            res.final["diverged_epoch"] = epoch
            return False
        if target_hit(cfg, row, self.target[k]):
            res.final.update(target_epoch=epoch, target_steps=steps, target_samples=samples)
            return False
        if self.keep_state[k] and epoch == cfg.epochs:  # for a longer run to continue
            res.state = capture(self.stepper, self.active.index(k), self.nets[k], self.gens[k],
                                self.probes[k], epoch, steps, samples, self.train_seconds[k])
        return True

    def _finish(self, k: int) -> None:
        """The `final` summary: the last row's numbers, the best test accuracy, the status."""
        res, cfg = self.results[k], self.cfgs[k]
        last = res.epochs[-1]
        res.final.update({key: v for key, v in last.items() if isinstance(v, (int, float))})
        m = f"test_{self.objective.metric_name}"
        vals = [v for e in res.epochs if isinstance(v := e.get(m), float) and math.isfinite(v)]
        best = max if self.objective.higher_is_better else min
        res.final[f"best_{m}"] = best(vals, default=None)
        res.final["train_seconds"] = self.train_seconds[k]
        res.final["status"] = res.status
        if self.vectorized:
            res.final["vectorized_k"] = self.K
        if cfg.target_metric is not None:
            res.final["target_reached"] = "target_epoch" in res.final
        if (res.status == "completed" and self.eval_objective is None
                and "test" in self.td.eval_sets):
            # per-example correctness on the shared test set: paired accuracy intervals
            res.final["test_correct_bits"] = correct_bits(self.nets[k], *self.td.eval_sets["test"])

    def _gap(self, row: dict[str, Any]) -> float | None:
        """How much better the metric is on the training set than on the test set (None when
        the train set is not evaluated: `train_eval_size=0`)."""
        m = self.objective.metric_name
        if f"train_{m}" not in row or f"test_{m}" not in row:
            return None
        d = row[f"train_{m}"] - row[f"test_{m}"]
        return d if self.objective.higher_is_better else -d

    def _nets_in_train_mode(self) -> None:
        for net in self.nets:
            net.train()

    def _sync_device(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


def target_hit(cfg: TrainConfig, row: dict[str, Any],
               target: tuple[str, bool] | None = None) -> bool:
    """Whether an epoch row meets the config's target (loss: at most, accuracy: at least;
    `target` from `resolve_target` for another objective)."""
    if cfg.target_metric is None:
        return False
    key, lower = target if target is not None else (cfg.target_metric, cfg.target_metric.endswith("loss"))
    if row.get(key) is None:
        return False
    v = row[key]
    return v <= cfg.target_value if lower else v >= cfg.target_value
