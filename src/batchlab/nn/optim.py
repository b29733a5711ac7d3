"""Optimizers for the autograd path, built from a TrainConfig.

Parameters are grouped per weight layer (Linear, Conv, ...; group name `layerN`, with the layer's norm
parameters beside it), so layer-wise methods (LARS, curvature-based lrs) and per-layer
settings see one group per layer. Each group carries `lr_scale`; the engine sets
`group["lr"] = scheduled_lr * group["lr_scale"]` every step. Further optimizers register
a builder in `OPTIMIZERS`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from batchlab.errors import ConfigError

Builder = Callable[[Any, list[dict[str, Any]]], torch.optim.Optimizer]
OPTIMIZERS: dict[str, Builder] = {}


def register(name: str) -> Callable[[Builder], Builder]:
    def deco(fn: Builder) -> Builder:
        OPTIMIZERS[name] = fn
        return fn

    return deco


def layer_groups(model: nn.Module) -> list[dict[str, Any]]:
    """One param group per weight layer (a module owning a parameter of 2+ dimensions: Linear,
    Conv, Embedding); parameters of other modules (BatchNorm) join the preceding layer's group.
    Models without such layers get one group."""
    groups: list[dict[str, Any]] = []
    seen: set[int] = set()
    for _, mod in model.named_modules():
        own = [p for p in mod.parameters(recurse=False) if p.requires_grad and id(p) not in seen]
        if not own:
            continue
        if any(p.dim() >= 2 for p in own) or not groups:
            groups.append({"params": [], "name": f"layer{len(groups) + 1}", "lr_scale": 1.0})
        groups[-1]["params"].extend(own)
        seen.update(id(p) for p in own)
    return groups


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
    _load_extras()
    if cfg.optimizer not in OPTIMIZERS:
        raise ConfigError(
            f"unknown optimizer {cfg.optimizer!r}; available: {', '.join(sorted(OPTIMIZERS))}"
        )
    if cfg.optimizer == "sgd" and cfg.nesterov and cfg.momentum == 0:
        raise ConfigError("nesterov needs momentum > 0")
    return OPTIMIZERS[cfg.optimizer](cfg, layer_groups(model))


def _load_extras() -> None:
    """Optimizers defined in other modules (layer-wise methods) register on import."""
    import importlib

    for mod in ("batchlab.nn.layerwise",):
        try:
            importlib.import_module(mod)
        except ModuleNotFoundError as e:
            if e.name != mod:
                raise
