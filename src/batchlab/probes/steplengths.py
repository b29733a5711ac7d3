"""Step lengths per optimizer step (Gao & Zhong's structural measurements) and per-layer
curvature per epoch.

On every `record_every`-th step (after the backward pass, before the update) the probe records
the gradient norm ||g_t||, keeps a copy of the weights and the loss of the batch; on the next
step it measures the parameter-update length ||w_{t+1} - w_t|| and the loss-update length
L_t(w_{t+1}) - L_t(w_t) on the same batch. Epoch ends report their means (`step_grad_norm`,
`step_update_norm`, `step_loss_update`) and the top eigenvalue of each layer's Hessian block on
a fixed subset of the training set (`curv_layerN`, Lanczos, 10 products per layer).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from batchlab.probes import Probe, ProbeContext, register


class StepLengthProbe(Probe):
    name = "steplengths"
    every_steps = 1
    needs_grad = True
    record_every = 5
    curvature_samples = 512

    def __init__(self) -> None:
        self._pending: tuple[torch.Tensor, torch.Tensor, torch.Tensor, float] | None = None
        self._sums = {"step_grad_norm": 0.0, "step_update_norm": 0.0, "step_loss_update": 0.0}
        self._n = {k: 0 for k in self._sums}

    @staticmethod
    def _flat(model: torch.nn.Module) -> torch.Tensor:
        return torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    @torch.no_grad()
    def on_step(self, ctx: ProbeContext, step: int, xb: torch.Tensor, yb: torch.Tensor) -> None:
        model = ctx.model
        self._resolve(model)
        if step % self.record_every != 1 % self.record_every:
            return
        gsq = sum(float(p.grad.pow(2).sum()) for p in model.parameters() if p.grad is not None)
        self._add("step_grad_norm", math.sqrt(gsq))
        self._pending = (self._flat(model), xb, yb, float(F.nll_loss(model(xb), yb)))

    @torch.no_grad()
    def _resolve(self, model: torch.nn.Module) -> None:
        """The recorded step's update has been applied: measure its lengths."""
        if self._pending is None:
            return
        w0, px, py, l0 = self._pending
        self._pending = None
        self._add("step_update_norm", float((self._flat(model) - w0).norm()))
        self._add("step_loss_update", float(F.nll_loss(model(px), py)) - l0)

    def _add(self, k: str, v: float) -> None:
        self._sums[k] += v
        self._n[k] += 1

    def on_epoch_end(self, ctx: ProbeContext, epoch: int) -> dict[str, float]:
        from batchlab.measure.curvature import hessian_eigenvalues

        self._resolve(ctx.model)
        out = {k: self._sums[k] / self._n[k] if self._n[k] else float("nan") for k in self._sums}
        self._sums = dict.fromkeys(self._sums, 0.0)
        self._n = dict.fromkeys(self._n, 0)
        x, y = ctx.data.x_train[: self.curvature_samples], ctx.data.y_train[: self.curvature_samples]
        res = hessian_eigenvalues(ctx.model, (x, y), per_layer=True, tol=1e-2, max_iter=10,
                                  seed=epoch, on_fail="ignore")
        out.update({f"curv_{name}": r.top for name, r in res.items()})
        return out


register("steplengths")(StepLengthProbe)
