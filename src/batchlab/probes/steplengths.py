"""Step lengths per optimizer step (Gao & Zhong's structural measurements) and per-layer
curvature per epoch.

For every `record_every`-th step t (t = 1, 1 + record_every, ...) the probe measures, on that
step's batch B_t: the gradient norm ||g_t|| at the pre-update weights w_{t-1}, the
parameter-update length ||w_t - w_{t-1}|| and the loss-update length
L_t(w_t) - L_t(w_{t-1}). Probes run after the update (see `batchlab.probes`), so it keeps a
copy of the weights from the step before (w_{t-1}) and evaluates L_t(w_{t-1}) on that copy
(`torch.func.functional_call`). Epoch ends report their means (`step_grad_norm`,
`step_update_norm`, `step_loss_update`) and the top eigenvalue of each layer's Hessian block on
a fixed subset of the training set (`curv_layerN`, Lanczos, 10 products per layer).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch.func import functional_call

from batchlab.probes.base import Probe, ProbeContext, register


class StepLengthProbe(Probe):
    name = "steplengths"
    every_steps = 1
    needs_grad = True
    record_every = 5
    curvature_samples = 512

    def __init__(self) -> None:
        self._before: dict[str, torch.Tensor] | None = None  # w_{t-1} for the next measured t
        self._sums = {"step_grad_norm": 0.0, "step_update_norm": 0.0, "step_loss_update": 0.0}
        self._n = {k: 0 for k in self._sums}

    def _measured(self, step: int) -> bool:
        return step % self.record_every == 1 % self.record_every

    @staticmethod
    def _params(model: torch.nn.Module) -> dict[str, torch.Tensor]:
        return {k: p.detach().clone() for k, p in model.named_parameters()}

    def on_start(self, ctx: ProbeContext) -> dict[str, float]:
        self._before = self._params(ctx.model) if self._measured(1) else None
        return {}

    @torch.no_grad()
    def on_step(self, ctx: ProbeContext, step: int, xb: torch.Tensor, yb: torch.Tensor) -> None:
        model = ctx.model
        if self._measured(step) and self._before is not None:
            before, self._before = self._before, None
            params = dict(model.named_parameters())
            gsq = sum(float(p.grad.pow(2).sum()) for p in params.values() if p.grad is not None)
            self._add("step_grad_norm", math.sqrt(gsq))
            upd = sum(float((params[k].detach() - w).pow(2).sum()) for k, w in before.items())
            self._add("step_update_norm", math.sqrt(upd))
            l0 = float(F.nll_loss(functional_call(model, before, (xb,)), yb))
            self._add("step_loss_update", float(F.nll_loss(model(xb), yb)) - l0)
        if self._measured(step + 1):
            self._before = self._params(model)

    def _add(self, k: str, v: float) -> None:
        self._sums[k] += v
        self._n[k] += 1

    def on_epoch_end(self, ctx: ProbeContext, epoch: int) -> dict[str, float]:
        from batchlab.measure.curvature import hessian_eigenvalues

        out = {k: self._sums[k] / self._n[k] if self._n[k] else float("nan") for k in self._sums}
        self._sums = dict.fromkeys(self._sums, 0.0)
        self._n = dict.fromkeys(self._n, 0)
        x, y = ctx.data.x_train[: self.curvature_samples], ctx.data.y_train[: self.curvature_samples]
        res = hessian_eigenvalues(ctx.model, (x, y), per_layer=True, tol=1e-2, max_iter=10,
                                  seed=epoch, on_fail="ignore")
        out.update({f"curv_{name}": r.top for name, r in res.items()})
        return out


register("steplengths")(StepLengthProbe)
