"""Training-time measurements for "which batch size should I use?".

* `noise_scale`: B_simple = tr(Sigma)/|G|^2 (see `batchlab.measure.noise`) every
  `every_steps` steps on a fixed, seeded sample of training examples (after that step's
  update, as every probe: see `batchlab.probes`), from per-example gradients it computes
  itself from the live model - so it needs no `.grad` and keeps the fused engine. McCandlish
  et al. report that it grows as the loss falls; the per-epoch rows carry the last value with its
  parts and the loss on the sample, `b_simple_avg` = the epoch's mean tr(Sigma) / mean |G|^2
  (single-iterate values swing a lot, see `noise.averaged`), and `history` keeps every
  measurement.
* `target_step`: the first optimizer step s whose updated weights cross the run's target
  (config `target_metric`/`target_value`), checked about `checks_per_epoch` times an epoch.
  The engine stops at epoch granularity; steps-to-target needs finer resolution than that.
  `test_acc`/`val_acc` are evaluated on the full eval set; `train_loss`/`train_acc` on a fixed
  seeded subset of at most `train_subset` training examples (an estimate, said so here; the
  first ones of a stream). Any objective's loss or metric works (`*_metric`, batchlab.task).
Both take the run's objective (`ctx.objective`; classification when None) and draw their
examples with `batchlab.data.stream.sample_data`, so they work on streamed data too.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from batchlab.data.stream import sample_data
from batchlab.measure.metrics import evaluate, evaluate_objective
from batchlab.measure.noise import averaged, b_simple, default_loss
from batchlab.probes.base import Probe, ProbeContext, register
from batchlab.task import Classification, objective_for, resolve_target


def _device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


class NoiseScaleProbe(Probe):
    name = "noise_scale"

    def __init__(self, every_steps: int = 100, n_examples: int = 256, seed: int = 0) -> None:
        self.every_steps = every_steps
        self.n_examples = n_examples
        self.seed = seed
        self.history: list[dict[str, float]] = []
        self._epoch: list[float] = []

    def on_start(self, ctx: ProbeContext) -> dict[str, float]:
        self._loss = objective_for(ctx.objective)
        self._x, self._y = sample_data(ctx.data, self.n_examples, self.seed + 104729,
                                       _device(ctx.model))
        self.history.clear()
        self._epoch = []
        rec = self._measure(ctx, 0)
        self._epoch = []  # the initial value belongs to epoch 0 only
        return self._prefix(rec)

    def _measure(self, ctx: ProbeContext, step: float) -> dict[str, float]:
        # classification: cross-entropy, equal to the NLL on log-probabilities (as before)
        loss_fn = default_loss if isinstance(self._loss, Classification) else self._loss
        est = b_simple(ctx.model, self._x, self._y, n_boot=0, seed=self.seed, loss_fn=loss_fn)
        with torch.no_grad():
            was = ctx.model.training
            ctx.model.eval()
            loss = float(loss_fn(ctx.model(self._x), self._y))
            ctx.model.train(was)
        rec = {"step": float(step), "b_simple": est.b_simple, "grad_sq": est.grad_sq,
               "trace_sigma": est.trace_sigma, "loss": loss}
        self.history.append(rec)
        self._epoch.append(est.b_simple)
        return rec

    @staticmethod
    def _prefix(rec: dict[str, float]) -> dict[str, float]:
        return {"b_simple": rec["b_simple"], "b_simple_grad_sq": rec["grad_sq"],
                "b_simple_trace_sigma": rec["trace_sigma"], "b_simple_loss": rec["loss"]}

    def on_step(self, ctx: ProbeContext, step: int, xb: torch.Tensor, yb: torch.Tensor) -> None:
        self._measure(ctx, step)

    def on_epoch_end(self, ctx: ProbeContext, epoch: int) -> dict[str, float]:
        if not self._epoch:  # epochs shorter than every_steps: measure once at the epoch end
            self._measure(ctx, math.nan)  # the engine does not pass the step count here
        k = len(self._epoch)
        out = self._prefix(self.history[-1])
        # ratio of the epoch's mean tr(Sigma) to its mean |G|^2 (see noise.averaged)
        out["b_simple_avg"] = averaged([(h["trace_sigma"], h["grad_sq"])
                                        for h in self.history[-k:]], n_boot=0).b_simple
        self._epoch = []
        return out


class TargetStepProbe(Probe):
    name = "target_step"

    def __init__(self, checks_per_epoch: int = 8, train_subset: int = 4096,
                 checks_every: int = 25) -> None:
        self.every_steps = 1  # set from the batch size in on_start
        self.checks_every = checks_every  # steps between checks on a stream of unknown length
        self.checks_per_epoch = checks_per_epoch
        self.train_subset = train_subset
        self.first: int | None = None
        self.best = math.nan

    def on_start(self, ctx: ProbeContext) -> dict[str, float]:
        cfg = ctx.config
        self.first, self.best = None, math.nan
        if cfg.target_metric is None:
            self.every_steps = None
            return {}
        self._target = resolve_target(cfg, ctx.objective)
        n_train = ctx.data.n_train
        if n_train is None:  # a stream without a length: check every `checks_every` steps
            self.every_steps = self.checks_every
        else:
            steps_per_epoch = math.ceil(n_train / min(cfg.batch_sizes()))
            self.every_steps = max(1, steps_per_epoch // self.checks_per_epoch)
        if cfg.target_metric.startswith("train"):
            self._eval = sample_data(ctx.data, self.train_subset, cfg.seed + 7, _device(ctx.model))
        elif getattr(ctx.data, "streamed", False):
            self._eval = None  # the test stream, batch by batch
        else:
            self._eval = ctx.data.eval_sets[cfg.target_metric.split("_")[0]]
        self._check(ctx, 0)
        return {}

    def _check(self, ctx: ProbeContext, step: int) -> None:
        cfg = ctx.config
        key, lower = self._target
        if isinstance(objective_for(ctx.objective), Classification) and self._eval is not None:
            loss, metric = evaluate(ctx.model, *self._eval)
        else:
            obj = objective_for(ctx.objective)
            batches = ([self._eval] if self._eval is not None else
                       ctx.data.eval_batches(cfg.target_metric.split("_")[0]))
            loss, metric = evaluate_objective(ctx.model, obj, batches, _device(ctx.model))
        v = float(loss if key.endswith("_loss") else metric)
        if math.isfinite(v) and (math.isnan(self.best) or (v < self.best if lower else v > self.best)):
            self.best = v
        hit = v <= cfg.target_value if lower else v >= cfg.target_value
        if hit and self.first is None:
            self.first = step

    def on_step(self, ctx: ProbeContext, step: int, xb: torch.Tensor, yb: torch.Tensor) -> None:
        if self.first is None:
            self._check(ctx, step)

    def on_epoch_end(self, ctx: ProbeContext, epoch: int) -> dict[str, float]:
        if ctx.config.target_metric is None:
            return {}
        return {"target_step": float(self.first) if self.first is not None else math.nan,
                "target_best": self.best}

    def save_state(self) -> dict[str, Any]:
        """The first step it saw the target reached and the best value so far."""
        return {"first": self.first, "best": None if math.isnan(self.best) else self.best}

    def load_state(self, state: dict[str, Any]) -> None:
        self.first = state["first"]
        self.best = math.nan if state["best"] is None else float(state["best"])


register("noise_scale")(NoiseScaleProbe)
register("target_step")(TargetStepProbe)
