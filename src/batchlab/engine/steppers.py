"""Steppers: how one optimizer step is computed for the K models of a pass. The loop
(`engine/loop.py`) owns everything else - epochs, shuffles, schedules, evaluation, probes,
checkpoints, stopping - and is the same for every stepper.

- `AutogradStepper` (K = 1): torch.autograd + the config's torch optimizer; anything a module
  and an optimizer can express (Adam, LARS, CBLR, batchnorm, discarding, gradient probes).
- `FusedStepper` (K >= 1): plain/momentum SGD on batchlab's MLP through `FusedMLPSGD`'s manual
  backward; K > 1 stacks the models and steps them together with batched matmuls.

(`engine/deferred.py`, the deferred low-rank SGD pass, needs a whole pass's batches in advance
and so is not a per-step stepper; gradient-competition drives it directly.)

Which one a run gets is decided in one place, `engine.choice.choose_engine`; `make_stepper`
builds what it names, and the throughput measurements and the `--plan` probe time steppers
built here, so they time the step a run takes.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import nullcontext
from typing import Any, Protocol

import torch
from torch import nn

from batchlab.config import TrainConfig
from batchlab.engine.choice import choose_engine, refusal_or_choice
from batchlab.engine.fused import FusedMLPSGD
from batchlab.errors import BatchlabError, ConfigError
from batchlab.nn.optim import build_optimizer
from batchlab.probes import Probe
from batchlab.task import Objective, objective_for


class Stepper(Protocol):
    """One optimizer step over K models.

    `step` takes the batches xb [K, B, ...], yb [K, B] (one per model) and the K learning
    rates, updates the weights, and returns the K batch losses (mean NLL at the pre-update
    weights, a [K] device tensor: no host sync). `sync` makes each model's module hold its
    current weights (a stepper may keep its own stacked copy); `keep` drops the models not at
    the given stacked positions (they stopped: diverged or reached their target)."""

    engine: str
    optimizer: torch.optim.Optimizer | None

    def step(self, xb: torch.Tensor, yb: torch.Tensor, lr: Sequence[float]) -> torch.Tensor: ...
    def sync(self) -> None: ...
    def keep(self, positions: Sequence[int]) -> None: ...


class AutogradStepper:
    """K = 1 on torch.autograd with the config's optimizer and the run's objective
    (`batchlab.task`; classification's NLL by default).

    With `keep_grads`, each parameter's `.grad` still holds the batch gradient at the
    pre-update weights after `step` returns (some optimizers, e.g. Nesterov SGD, overwrite it
    in place): gradient probes run after the update and read it there.

    `cfg.amp`: "bf16" runs the forward pass under bf16 autocast (CPU or GPU); "fp16" under fp16
    autocast with a GradScaler (GPU only: fp16 autocast on the CPU is refused). The loss is
    taken on float32 outputs, and `.grad` is unscaled before probes read it, so gradients mean
    the same with or without AMP. A step the scaler skips (inf/NaN gradients) leaves the weights
    as they were; its loss still counts in the epoch's running loss."""

    engine = "autograd"

    def __init__(self, cfg: TrainConfig, model: nn.Module, *, keep_grads: bool = False,
                 objective: Objective | None = None) -> None:
        self.cfg, self.model = cfg, model
        self.objective = objective if objective is not None else objective_for(cfg.loss)
        self.optimizer: torch.optim.Optimizer | None = build_optimizer(cfg, model)
        self.keep_grads = keep_grads
        self.steps = 0  # steps taken (the optimizer's `on_step_begin` hook gets it)
        self.device_type = _device_type(model)
        self.autocast, self.scaler = amp_context(cfg.amp, self.device_type)

    def step(self, xb: torch.Tensor, yb: torch.Tensor, lr: Sequence[float]) -> torch.Tensor:
        x, y, opt, net = xb[0], yb[0], self.optimizer, self.model
        assert opt is not None
        for g in opt.param_groups:
            g["lr"] = lr[0] * g.get("lr_scale", 1.0)
        hook = getattr(opt, "on_step_begin", None)
        if hook is not None:
            hook(net, x, y, self.steps)
        with self.autocast():
            out = net(x)
        if self.autocast is not nullcontext:
            out = out.float()
        obj = self.objective
        if self.cfg.discard_fraction > 0:
            # drop the lowest-loss fraction of the batch before the update (keep at least one)
            per = obj.per_example(out, y)
            if per is None:
                raise ConfigError(f"discard_fraction needs per-example losses; loss {obj.name} "
                                  f"has none")
            keep = max(1, int(round(len(y) * (1 - self.cfg.discard_fraction))))
            loss = per.topk(keep).values.mean()
            reported = per.detach().mean()
        else:
            loss = obj.loss(out, y)
            reported = loss.detach()
        opt.zero_grad(set_to_none=True)
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.unscale_(opt)  # probes and clipping see true gradients
        else:
            loss.backward()
        params = [p for p in net.parameters() if p.grad is not None] if self.keep_grads else []
        grads = [p.grad.clone() for p in params]
        if self.scaler is not None:
            self.scaler.step(opt)
            self.scaler.update()
        else:
            opt.step()
        for p, g in zip(params, grads):
            p.grad = g
        self.steps += 1
        return reported.float().unsqueeze(0)

    def sync(self) -> None:
        """The module is the model: nothing to copy."""

    def keep(self, positions: Sequence[int]) -> None:
        """K = 1: the loop ends when its model stops."""


def _device_type(model: nn.Module) -> str:
    p = next(model.parameters(), None)
    return p.device.type if p is not None else "cpu"


def amp_context(amp: str, device_type: str) -> tuple[Callable[[], Any], Any]:
    """(a context-manager factory for the forward pass, a GradScaler or None) for `amp`.
    fp16 on the CPU is refused: CPU autocast in fp16 is slow and has no loss scaling here."""
    if amp == "off":
        return nullcontext, None
    if amp == "fp16" and device_type == "cpu":
        raise ConfigError("amp fp16 needs a GPU (fp16 autocast + GradScaler); on the CPU use "
                          "amp bf16 or off")
    if amp not in ("bf16", "fp16"):
        raise ConfigError(f"unknown amp {amp!r}; use off, bf16 or fp16")
    dtype = torch.bfloat16 if amp == "bf16" else torch.float16
    scaler = torch.amp.GradScaler(device_type) if amp == "fp16" else None
    return (lambda: torch.autocast(device_type=device_type, dtype=dtype)), scaler


class FusedStepper:
    """Plain/momentum SGD on K >= 1 MLPs (`FusedMLPSGD`). K = 1 updates the module's own
    parameters in place (views) with a float lr; K > 1 steps a stacked copy with a [K] lr
    tensor and copies it into the modules on `sync`."""

    engine = "fused"
    optimizer = None

    def __init__(self, cfg: TrainConfig, models: Sequence[nn.Module]) -> None:
        self.models = list(models)
        self.stacked = len(self.models) > 1
        self.impl = FusedMLPSGD.from_mlps(self.models, momentum=cfg.momentum,
                                          nesterov=cfg.nesterov, weight_decay=cfg.weight_decay)
        self._lr: list[float] = []
        self._lr_t: torch.Tensor | None = None

    def step(self, xb: torch.Tensor, yb: torch.Tensor, lr: Sequence[float]) -> torch.Tensor:
        if not self.stacked:
            return self.impl.step(xb, yb, lr[0])
        if self._lr_t is None or list(lr) != self._lr:  # a new tensor only when an lr changes
            self._lr = list(lr)
            self._lr_t = torch.tensor(self._lr, dtype=xb.dtype, device=xb.device)
        return self.impl.step(xb, yb, self._lr_t)

    def sync(self) -> None:
        self.impl.write_back(self.models)

    def keep(self, positions: Sequence[int]) -> None:
        """Restack the models at `positions`, momentum buffers included."""
        self.impl = self.impl.select(positions)
        self.models = [self.models[p] for p in positions]
        self._lr_t = None


def make_stepper(cfgs: Sequence[TrainConfig], models: Sequence[nn.Module],
                 probes: Sequence[Sequence[Probe]], *, objective: Objective | None = None,
                 streamed: bool = False) -> Stepper:
    """The stepper for a pass, of the kind `choose_engine` names: K > 1 is always fused (the
    planner grouped fused-eligible configs; anything else is a BatchlabError); K = 1 is the
    config's choice. `objective`: the run's loss when it is a Python object (else the config's
    `loss` names it)."""
    if len(models) > 1:
        choices = [refusal_or_choice(c, p, model=m, streamed=streamed,
                                     loss_object=objective is not None)
                   for c, m, p in zip(cfgs, models, probes)]
        why = next((c.reason for c in choices if not c.fused), None)
        if why is not None:
            raise BatchlabError(f"a vectorized pass needs the fused engine: {why}")
        return FusedStepper(cfgs[0], models)
    cfg, model = cfgs[0], models[0]
    choice = choose_engine(cfg, probes[0], model=model, streamed=streamed,
                           loss_object=objective is not None)
    if choice.fused:
        return FusedStepper(cfg, models)
    return AutogradStepper(cfg, model, keep_grads=any(p.needs_grad for p in probes[0]),
                           objective=objective)
