"""Weight geometry per epoch: how far and in which direction the weights moved.

The study's measurements: L2 distance between current and initial parameters, weights (W) and
biases (B) separately and per layer; distance from the origin (the norms); per-layer cosine
similarity between initial and current weights. Works per parameter tensor on any model:
W = every parameter of two or more dimensions (Linear and Conv weights, embeddings), B = the
rest (biases, norm-layer scales and shifts); a "layer" is a module that owns a W tensor
(Linear, Conv, Embedding, ...), named layer1..layerN in registration order (for the study's MLP:
its Linear layers in forward order), with its own W and B. Cheap: a few reductions per tensor.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from batchlab.probes.base import Probe, ProbeContext, register


def weight_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, module) of every module owning a parameter of 2+ dimensions, named layer1..layerN
    in registration order (a module reached twice counts once)."""
    out: list[tuple[str, nn.Module]] = []
    for _, m in model.named_modules():
        if any(p.dim() >= 2 for p in m.parameters(recurse=False)):
            out.append((f"layer{len(out) + 1}", m))
    return out


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _sq(t: torch.Tensor) -> torch.Tensor:
    return t.detach().double().pow(2).sum()


@torch.no_grad()
def geometry(model: nn.Module, init_state: dict[str, torch.Tensor]) -> dict[str, float]:
    """Distances, norms and cosines of `model` relative to `init_state` (its state_dict at
    init: same parameter names)."""
    zero = torch.zeros((), dtype=torch.float64, device=next(model.parameters()).device)
    dw, db, nw, nb = zero, zero, zero, zero
    params = dict(model.named_parameters())
    for name, p in params.items():
        d, n = _sq(p - init_state[name]), _sq(p)
        if p.dim() >= 2:
            dw, nw = dw + d, nw + n
        else:
            db, nb = db + d, nb + n
    out: dict[str, torch.Tensor] = {}
    for lname, mod in weight_layers(model):
        own = list(mod.named_parameters(prefix=_prefix(model, mod), recurse=False))
        ws = [(n, p) for n, p in own if p.dim() >= 2]
        bs = [(n, p) for n, p in own if p.dim() < 2]
        d_w = sum((_sq(p - init_state[n]) for n, p in ws), zero)
        n_w = sum((_sq(p) for _, p in ws), zero)
        n_w0 = sum((_sq(init_state[n]) for n, _ in ws), zero)
        dot = sum(((p.double() * init_state[n].double()).sum() for n, p in ws), zero)
        out[f"dist_init_{lname}_w"] = d_w.sqrt()
        if bs:
            out[f"dist_init_{lname}_b"] = sum((_sq(p - init_state[n]) for n, p in bs), zero).sqrt()
        out[f"norm_{lname}_w"] = n_w.sqrt()
        out[f"cos_init_{lname}"] = dot / (n_w.sqrt() * n_w0.sqrt()).clamp_min(1e-30)
    out.update({"dist_init_w": dw.sqrt(), "dist_init_b": db.sqrt(), "norm_w": nw.sqrt(),
                "norm_b": nb.sqrt(), "dist_init": (dw + db).sqrt(), "norm": (nw + nb).sqrt()})
    keys = list(out)
    vals = torch.stack([out[k].reshape(()) for k in keys])
    return dict(zip(keys, vals.tolist()))  # one host sync


def _prefix(model: nn.Module, mod: nn.Module) -> str:
    for name, m in model.named_modules():
        if m is mod:
            return name
    raise KeyError("module not in model")


class GeometryProbe(Probe):
    name = "geometry"

    def on_start(self, ctx: ProbeContext) -> dict[str, float]:
        return geometry(ctx.model, ctx.init_state)

    def on_epoch_end(self, ctx: ProbeContext, epoch: int) -> dict[str, float]:
        return geometry(ctx.model, ctx.init_state)

    def save_state(self) -> dict[str, Any]:
        """Nothing: it measures the weights against the init, which a run rebuilds."""
        return {}


register("geometry")(GeometryProbe)
