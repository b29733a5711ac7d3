"""Parameters grouped per layer: the one definition of "a layer" shared by the layer-wise
optimizers (`batchlab.nn.optim`, `batchlab.nn.layerwise`) and the per-layer Hessian blocks of
`batchlab.measure.curvature`. It lives in the measure layer so that both can import it without
the measurements depending on the optimizers."""

from __future__ import annotations

from typing import Any

from torch import nn


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


def parameter_blocks(model: nn.Module) -> dict[str, list[str]]:
    """Parameter names grouped per layer, as the layer-wise optimizers see them: one block per
    weight layer (weight and bias, plus the norm parameters that follow it), named
    layer1..layerN."""
    ids = {id(p): n for n, p in model.named_parameters()}
    return {g["name"]: [ids[id(p)] for p in g["params"]] for g in layer_groups(model)}
