"""Weight geometry per epoch: how far and in which direction the weights moved.

The study's measurements: L2 distance between current and initial parameters, weights (W) and
biases (B) separately and per Linear layer; distance from the origin (the norms); per-layer
cosine similarity between initial and current weights. Cheap: a few reductions over 1.9M floats.
"""

from __future__ import annotations

import torch
from torch import nn

from batchlab.probes import Probe, ProbeContext, register


def linear_layers(model: nn.Module) -> list[tuple[str, nn.Linear]]:
    """(name, layer) of every Linear, named layer1..layerN in forward order."""
    lins = [m for m in model.modules() if isinstance(m, nn.Linear)]
    return [(f"layer{i + 1}", m) for i, m in enumerate(lins)]


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@torch.no_grad()
def geometry(model: nn.Module, init_state: dict[str, torch.Tensor]) -> dict[str, float]:
    """Distances, norms and cosines of `model` relative to `init_state` (same module names)."""
    sq: dict[str, torch.Tensor] = {}
    params = dict(model.named_parameters())
    names = {id(m): n for n, m in model.named_modules()}
    out: dict[str, torch.Tensor] = {}
    dw = db = nw = nb = 0.0
    for lname, lin in linear_layers(model):
        prefix = names[id(lin)]
        w, b = params[f"{prefix}.weight"], params[f"{prefix}.bias"]
        w0, b0 = init_state[f"{prefix}.weight"], init_state[f"{prefix}.bias"]
        d_w = (w - w0).pow(2).sum()
        d_b = (b - b0).pow(2).sum()
        n_w, n_b = w.pow(2).sum(), b.pow(2).sum()
        dw, db, nw, nb = dw + d_w, db + d_b, nw + n_w, nb + n_b
        out[f"dist_init_{lname}_w"] = d_w.sqrt()
        out[f"dist_init_{lname}_b"] = d_b.sqrt()
        out[f"norm_{lname}_w"] = n_w.sqrt()
        out[f"cos_init_{lname}"] = (w * w0).sum() / (n_w.sqrt() * w0.norm()).clamp_min(1e-30)
    sq = {"dist_init_w": dw, "dist_init_b": db, "norm_w": nw, "norm_b": nb}
    for k, v in sq.items():
        out[k] = torch.as_tensor(v).sqrt()
    out["dist_init"] = (torch.as_tensor(dw) + db).sqrt()
    out["norm"] = (torch.as_tensor(nw) + nb).sqrt()
    keys = list(out)
    vals = torch.stack([torch.as_tensor(out[k], dtype=torch.float64).reshape(()) for k in keys])
    return dict(zip(keys, vals.tolist()))  # one host sync


class GeometryProbe(Probe):
    name = "geometry"

    def on_start(self, ctx: ProbeContext) -> dict[str, float]:
        return geometry(ctx.model, ctx.init_state)

    def on_epoch_end(self, ctx: ProbeContext, epoch: int) -> dict[str, float]:
        return geometry(ctx.model, ctx.init_state)


register("geometry")(GeometryProbe)
