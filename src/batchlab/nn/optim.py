"""Optimizers for the autograd path, built from a TrainConfig.

Parameters are grouped per weight layer (Linear, Conv, ...; group name `layerN`, with the layer's norm
parameters beside it), so layer-wise methods (LARS, curvature-based lrs) and per-layer
settings see one group per layer. Each group carries `lr_scale`; the engine sets
`group["lr"] = scheduled_lr * group["lr_scale"]` every step. Further optimizers register
a builder in `OPTIMIZERS`.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from batchlab.errors import ConfigError
from batchlab.measure.layers import layer_groups
from batchlab.nn import layerwise  # noqa: F401  (registers lars, cblr and mclr on import)
from batchlab.nn.registry import OPTIMIZERS, register

__all__ = ["OPTIMIZERS", "build_optimizer", "layer_groups", "register"]


@register("sgd")
def _sgd(cfg: Any, groups: list[dict[str, Any]]) -> torch.optim.Optimizer:
    return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov,
                           weight_decay=cfg.weight_decay, foreach=True)


@register("adam")
def _adam(cfg: Any, groups: list[dict[str, Any]]) -> torch.optim.Optimizer:
    return torch.optim.Adam(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps,
                            weight_decay=cfg.weight_decay, foreach=True)


@register("adamw")
def _adamw(cfg: Any, groups: list[dict[str, Any]]) -> torch.optim.Optimizer:
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps,
                             weight_decay=cfg.weight_decay, foreach=True)


def build_optimizer(cfg: Any, model: nn.Module) -> torch.optim.Optimizer:
    if cfg.optimizer not in OPTIMIZERS:
        raise ConfigError(
            f"unknown optimizer {cfg.optimizer!r}; available: {', '.join(sorted(OPTIMIZERS))}"
        )
    if cfg.optimizer == "sgd" and cfg.nesterov and cfg.momentum == 0:
        raise ConfigError("nesterov needs momentum > 0")
    return OPTIMIZERS[cfg.optimizer](cfg, layer_groups(model))

