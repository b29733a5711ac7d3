"""The optimizer registry: name -> builder(cfg, param_groups).

This is where an optimizer is registered, built-in or not: `register_optimizer(name, build)`
(or the `@register(name)` decorator) makes `TrainConfig(optimizer=name)` valid, offers the name
as a `--optimizer` choice, and lets `optim.build_optimizer` build it. The config layer keeps only
the names (`batchlab.config.optimizer_names`), so a config validates without importing torch.

Why its own module: the built-in optimizers (`optim.py`) and the layer-wise methods
(`layerwise.py`) both register here, so neither has to import the other to find the registry
(they used to import each other, one of them by string).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from batchlab.config import add_optimizer_name, remove_optimizer_name

Builder = Callable[[Any, list[dict[str, Any]]], torch.optim.Optimizer]
OPTIMIZERS: dict[str, Builder] = {}


def register_optimizer(name: str, build: Builder) -> None:
    """Register optimizer `name`: `build(cfg, param_groups)` returns the torch optimizer of a
    run whose config says `optimizer=name` (param groups as `optim.layer_groups` makes them,
    one per weight layer with its `lr_scale`). Registering a name again replaces its builder.
    The name is part of the config, hence of the store key: a changed builder under the same
    name would serve stale runs, so give a changed optimizer a new name."""
    if not callable(build):
        raise TypeError(f"optimizer {name!r}: build must be callable, got {type(build).__name__}")
    add_optimizer_name(name)
    OPTIMIZERS[name] = build


def unregister_optimizer(name: str) -> None:
    """Remove a registered optimizer (configs naming it no longer validate)."""
    OPTIMIZERS.pop(name, None)
    remove_optimizer_name(name)


def register(name: str) -> Callable[[Builder], Builder]:
    """Decorator form of `register_optimizer`."""
    def deco(fn: Builder) -> Builder:
        register_optimizer(name, fn)
        return fn

    return deco
