"""Batch-size and learning-rate schedules, as pure functions of the config and the position in
training. A scheduled run is still one run with one continuous per-epoch curve.

The lr at a step is  base_lr(phase) x prod(multipliers up to this epoch) x warmup(t) x decay(t)
with t the continuous epoch position (0 at the start, `epochs` at the end).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from batchlab.config import Phase, TrainConfig


@dataclass(frozen=True)
class EpochSetting:
    """One epoch's batch size and phase lr (before multipliers, warmup and decay)."""

    epoch: int  # 1-based
    batch_size: int
    base_lr: float


def epoch_settings(cfg: TrainConfig) -> list[EpochSetting]:
    """Batch size and phase lr for every epoch, expanding `schedule` phases in order. Named
    "settings", not "plan" (the `--plan` cost projection owns that word) nor "phases" (a
    `Phase` spans several epochs; this is one entry per epoch)."""
    # an unscheduled run is one phase (none at all for epochs=0: a Phase needs epochs > 0)
    phases = cfg.schedule or ([Phase(epochs=cfg.epochs)] if cfg.epochs > 0 else [])
    settings: list[EpochSetting] = []
    for ph in phases:
        bs = ph.batch_size or cfg.batch_size
        lr = ph.lr or cfg.lr
        for _ in range(ph.epochs):
            settings.append(EpochSetting(len(settings) + 1, bs, lr))
    return settings


def multiplier(cfg: TrainConfig, epoch: int) -> float:
    """Product of every `lr_multipliers` entry whose epoch is <= `epoch` (they accumulate)."""
    m = 1.0
    for e, f in cfg.lr_multipliers.items():
        if int(e) <= epoch:
            m *= f
    return m


def warmup_decay(cfg: TrainConfig, t: float) -> float:
    """Linear warmup over `warmup_epochs`, then step or cosine decay, at epoch position t."""
    f = 1.0
    if cfg.warmup_epochs > 0 and t < cfg.warmup_epochs:
        f *= max(t, 1e-12) / cfg.warmup_epochs
    if cfg.decay == "step":
        f *= cfg.decay_factor ** sum(1 for e in cfg.decay_epochs if t >= e)
    elif cfg.decay == "cosine" and cfg.epochs > 0:
        start = cfg.warmup_epochs
        span = max(cfg.epochs - start, 1e-12)
        u = min(max((t - start) / span, 0.0), 1.0)
        f *= 0.5 * (1.0 + math.cos(math.pi * u))
    return f


def lr_at(cfg: TrainConfig, ep: EpochSetting, step_in_epoch: int, steps_in_epoch: int) -> float:
    """The learning rate for one optimizer step."""
    t = ep.epoch - 1 + step_in_epoch / max(steps_in_epoch, 1)
    return ep.base_lr * multiplier(cfg, ep.epoch) * warmup_decay(cfg, t)


def constant_within_epoch(cfg: TrainConfig) -> bool:
    """True when the lr only changes at epoch boundaries (lets the engine skip per-step work)."""
    return cfg.warmup_epochs == 0 and cfg.decay in ("none", "step") and all(
        float(e).is_integer() for e in cfg.decay_epochs
    )


def linear_scaling(base_lr: float, base_batch: int, batch: int) -> float:
    """Goyal et al.: lr proportional to batch size."""
    return base_lr * batch / base_batch


def sqrt_scaling(base_lr: float, base_batch: int, batch: int) -> float:
    """Hoffer et al. / Krizhevsky: lr proportional to the square root of the batch size."""
    return base_lr * math.sqrt(batch / base_batch)
