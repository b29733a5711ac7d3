"""The probe protocol and the probe registry (see the package doc for when each hook runs).

Why its own module: the package discovers the built-in probes by importing its modules by
name, and they register themselves here; were these in the package's `__init__`, the package
and its probes would import each other.
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

    def save_state(self) -> dict[str, Any] | None:
        """What this probe carries from one epoch to the next, as JSON values, at the end of
        a run, so that a longer run can continue it (`engine.continuation`); None (the
        default) when it cannot say, which keeps its runs from being continued. Whatever
        `on_start` derives from the config and data is not state: it is set up again."""
        return None

    def load_state(self, state: dict[str, Any]) -> None:
        """Take back what `save_state` returned (after `on_start`)."""


PROBES: dict[str, Callable[[], Probe]] = {}


def register(name: str) -> Callable[[Callable[[], Probe]], Callable[[], Probe]]:
    def deco(factory: Callable[[], Probe]) -> Callable[[], Probe]:
        PROBES[name] = factory
        return factory

    return deco
