"""B_noise = tr(H Sigma) / (G^T H G): the gradient noise scale with curvature (McCandlish et
al., eq. 2.7-2.9), from per-example gradients and Hessian-vector products on a separate batch.
Split from `noise.py` (which holds B_simple and the per-example machinery it reuses)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from torch import nn
from torch.func import functional_call, grad, jvp, vmap
from torch.nn.attention import SDPBackend, sdpa_kernel

from batchlab.measure.noise import (
    EvalMode,
    LossFn,
    auto_chunk,
    default_loss,
    finite_or_none,
    model_state,
    per_example_grads,
)


@dataclass
class CurvatureNoise:
    b_noise: float
    trace_h_sigma: float  # tr(H Sigma)
    g_h_g: float  # G^T H G
    grad_sq: float  # |G|^2 from the same examples
    eps_max: float  # |G|^2 / G^T H G: greedy optimal step for the noiseless gradient
    n: int
    hessian_batch: int

    def eps_opt(self, batch_size: float) -> float:
        """McCandlish eq. 2.7: optimal lr at batch B = eps_max / (1 + B_noise / B)."""
        if not (math.isfinite(self.eps_max) and self.eps_max > 0 and self.b_noise > 0):
            return math.nan
        return self.eps_max / (1.0 + self.b_noise / batch_size)

    def to_json(self) -> dict:
        return {k: (finite_or_none(v) if isinstance(v, float) else v)
                for k, v in asdict(self).items()}


def b_noise(model: nn.Module, x: torch.Tensor, y: torch.Tensor, x_h: torch.Tensor,
            y_h: torch.Tensor, *, loss_fn: LossFn = default_loss, chunk: int | None = None
            ) -> CurvatureNoise:
    """B_noise = tr(H Sigma)/(G^T H G) from per-example gradients of (x, y) and the Hessian of
    the mean loss on the separate batch (x_h, y_h); estimator in the module docstring.
    Cost: one HVP (about two gradient evaluations on the Hessian batch) per example."""
    params, buffers = model_state(model)
    names = list(params)
    shapes = [params[k].shape for k in names]
    sizes = [params[k].numel() for k in names]

    def loss_h(p: dict[str, torch.Tensor]) -> torch.Tensor:
        return loss_fn(functional_call(model, (p, buffers), (x_h,)), y_h)

    def hvp_flat(v: torch.Tensor) -> torch.Tensor:
        vd = {k: t.reshape(s) for k, t, s in zip(names, v.split(sizes), shapes)}
        hv = jvp(grad(loss_h), (params,), (vd,))[1]
        return torch.cat([hv[k].reshape(-1) for k in names])

    chunk = chunk or max(1, auto_chunk(model) // 2)
    n = len(x)
    qs, gsum, sq = [], None, 0.0
    # attention's fused CPU/GPU kernels have no forward-mode derivative (the jvp below); the
    # math kernel computes the same attention from plain ops that have one
    with EvalMode(model), sdpa_kernel(SDPBackend.MATH):
        for g in per_example_grads(model, x, y, loss_fn=loss_fn, chunk=chunk):
            hg = vmap(hvp_flat)(g)
            qs.append((g.double() * hg.double()).sum(1))
            gsum = g.double().sum(0) if gsum is None else gsum + g.double().sum(0)
            sq += float(g.double().pow(2).sum())
        gbar = gsum / n
        hgbar = hvp_flat(gbar.to(params[names[0]].dtype)).double()  # not x_h: token ids are int
    q_mean = float(torch.cat(qs).mean())
    gbhgb = float(gbar @ hgbar)
    tr_hs = n / (n - 1) * (q_mean - gbhgb)
    ghg = gbhgb - tr_hs / n
    tr_s = (sq - n * float(gbar @ gbar)) / (n - 1)
    g2 = float(gbar @ gbar) - tr_s / n
    bn = tr_hs / ghg if ghg > 0 else math.inf
    eps_max = g2 / ghg if ghg > 0 and g2 > 0 else math.nan
    return CurvatureNoise(b_noise=bn, trace_h_sigma=tr_hs, g_h_g=ghg, grad_sq=g2,
                          eps_max=eps_max, n=n, hessian_batch=len(x_h))
