"""The optimizer registry: name -> builder(cfg, param_groups).

Why its own module: the built-in optimizers (`optim.py`) and the layer-wise methods
(`layerwise.py`) both register here, so neither has to import the other to find the registry
(they used to import each other, one of them by string).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

Builder = Callable[[Any, list[dict[str, Any]]], torch.optim.Optimizer]
OPTIMIZERS: dict[str, Builder] = {}


def register(name: str) -> Callable[[Builder], Builder]:
    """Decorator: make `name` buildable by `optim.build_optimizer`."""
    def deco(fn: Builder) -> Builder:
        OPTIMIZERS[name] = fn
        return fn

    return deco
