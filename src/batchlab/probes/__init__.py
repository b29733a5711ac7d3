"""Probes: measurements that plug into the training loop without touching it.

A probe is called at the start, optionally every `every_steps` optimizer steps (with the batch),
and at the end of every epoch, when it returns a flat dict of numbers that is stored with that
epoch's metrics.

When a probe sees the weights - the same in every engine (autograd, fused, vectorized K > 1):
- `on_start(ctx)`: the initial weights, before any step (its values are epoch 0's).
- `on_step(ctx, s, xb, yb)`: AFTER step s's update, i.e. the model holds the weights after s
  optimizer steps (s counts from 1 over the whole run); `xb`, `yb` are the batch step s used.
  A probe with `needs_grad = True` also finds on each parameter's `.grad` that batch's
  gradient at the PRE-update weights (the gradient step s's update used); it makes the engine
  use its autograd stepper (the fused steppers compute no `.grad`).
- `on_epoch_end(ctx, epoch)`: the weights after the epoch's last step.
The model is in train mode during `on_step`; use `measure.metrics.evaluate` (eval mode) for
clean evaluations.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn


@dataclass
class ProbeContext:
    """What a probe may look at: the live model, its initial weights, the optimizer (None on
    the fused path), the run config, the data (resident TensorData, or StreamData: draw
    examples with `batchlab.data.stream.sample_data`) and the run's objective."""

    model: nn.Module
    init_state: dict[str, torch.Tensor]
    config: Any
    data: Any
    optimizer: torch.optim.Optimizer | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    objective: Any = None  # the run's batchlab.task.Objective (None: classification)


class Probe:
    name: str = "probe"
    every_steps: int | None = None
    needs_grad: bool = False

    def on_start(self, ctx: ProbeContext) -> dict[str, float]:
        """Called once before training; may return metrics for epoch 0."""
        return {}

    def on_step(self, ctx: ProbeContext, step: int, xb: torch.Tensor, yb: torch.Tensor) -> None:
        """Called after the update of every `every_steps`-th step (see the module doc: the
        weights after `step` steps; `.grad` = the batch's pre-update gradient when
        `needs_grad`)."""

    def on_epoch_end(self, ctx: ProbeContext, epoch: int) -> dict[str, float]:
        return {}


PROBES: dict[str, Callable[[], Probe]] = {}


def register(name: str) -> Callable[[Callable[[], Probe]], Callable[[], Probe]]:
    def deco(factory: Callable[[], Probe]) -> Callable[[], Probe]:
        PROBES[name] = factory
        return factory

    return deco


def make_probes(names: list[str]) -> list[Probe]:
    from batchlab.errors import ConfigError

    _load_builtin()
    out = []
    for n in names:
        if n not in PROBES:
            raise ConfigError(f"unknown probe {n!r}; available: {', '.join(sorted(PROBES))}")
        out.append(PROBES[n]())
    return out


def _load_builtin() -> None:
    import importlib
    import pkgutil

    import batchlab.probes as pkg

    for mod in pkgutil.iter_modules(pkg.__path__):
        importlib.import_module(f"batchlab.probes.{mod.name}")
