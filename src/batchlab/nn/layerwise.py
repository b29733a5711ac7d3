"""Layer-wise learning rates for large-batch training: LARS, CBLR and MCLR.

All three are SGD with momentum and weight decay in which layer l steps with its own rate
lr_l = lr x factor_l, applied before momentum as in You et al. (LARS, Algorithm 1):

    d = g + wd w;   v <- m v + lr_l d;   w <- w - v

and they differ only in the factor, which in each case is the inverse of a per-layer curvature
estimate. That is the reading of Gao & Zhong ("Study on the Large Batch Size Training of Neural
Networks Based on the Second Order Gradient", 2020) that this module implements; the formulas
below are our choices where the paper's text leaves room, stated so they can be checked:

- **LARS** (You et al. 2017): factor = eta ||w|| / (||g|| + wd ||w||), eta = `trust_coefficient`,
  per parameter tensor. The paper notes that LARS is a special case of CBLR: near a minimum at
  the origin g ~ H w, so ||g|| / ||w|| is a secant estimate of the curvature and LARS steps like
  1/curvature. Biases are adapted too (no exclusion, as in LARS's Algorithm 1). A tensor whose
  weight or gradient norm is 0 (biases at their zero init) gets factor eta, i.e. the ratio
  ||w|| / ||g|| is taken as 1, so it can leave zero. (Implementations often use factor 1 here,
  but with LARS's large global lr that throws zero-initialized biases far on the first step:
  training on `digits` failed that way.)
- **CBLR** (curvature-based lr): the curvature of layer l is lambda_l, the top eigenvalue of the
  layer's diagonal Hessian block (weight and bias of one Linear, `batchlab.measure.curvature` per-layer
  Lanczos), measured on the current batch every `curvature_every` steps (in `on_step_begin`,
  on at most `curvature_samples` samples of it, 8 Lanczos steps: an estimate, not a converged
  eigenvalue; the residuals are kept in `last_residuals`). We choose
  factor_l = median_j(lambda_j) / lambda_l: step inversely to curvature (a Newton-like 1/lambda
  rule, which is what "fitting the curvature variation across layers" asks for), normalized by
  the median so that `lr` keeps its meaning (the median layer steps at lr, flatter layers
  faster, sharper ones slower). Curvatures are floored at 1e-3 max_j lambda_j so that a layer
  with ~0 or negative top curvature cannot get an unbounded rate.
- **MCLR** (median-curvature lr, the cheap approximation of CBLR): the same rule
  factor_l = median_j(kappa_j) / kappa_l, with the top eigenvalue replaced by a curvature that
  needs no Hessian-vector products: kappa_l = the *median* over the layer's weight matrix of
  the element-wise secant curvature |g_i| / |w_i| (the diagonal-Hessian analogue of LARS's norm
  ratio, under the paper's picture that parameters settle around their minima), recomputed
  every step from the gradient. The median is the robust choice: the element-wise ratio
  explodes for weights near 0, which would dominate a mean. An absolute form eta / kappa_l (like
  LARS) diverged in our tests: the median ratio is far below the norm ratio, so the relative
  form, which keeps `lr` meaningful, is used. The bias shares its layer's factor.

Every step records the factors in `last_factors` ({tensor name: factor}) for probes and tests.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from batchlab.nn.registry import register


class LayerwiseSGD(torch.optim.Optimizer):
    """Momentum SGD with a per-tensor (or per-group) lr factor; subclasses define `factors`."""

    def __init__(self, groups: list[dict[str, Any]], lr: float, momentum: float = 0.0,
                 weight_decay: float = 0.0, trust_coefficient: float = 1e-3) -> None:
        defaults = {"lr": lr, "momentum": momentum, "weight_decay": weight_decay,
                    "trust_coefficient": trust_coefficient}
        super().__init__(groups, defaults)
        self.last_factors: dict[str, float] = {}

    def factors(self) -> list[list[torch.Tensor | float]]:
        """One factor per parameter of every group (grads are present)."""
        raise NotImplementedError

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        loss = closure() if closure is not None else None
        facs = self.factors()
        record: dict[str, float] = {}
        for g, gf in zip(self.param_groups, facs):
            wd, m = g["weight_decay"], g["momentum"]
            for i, (p, f) in enumerate(zip(g["params"], gf)):
                if p.grad is None:
                    continue
                d = p.grad if wd == 0 else p.grad.add(p, alpha=wd)
                upd = d * (g["lr"] * f)
                if m > 0:
                    st = self.state[p]
                    if "momentum_buffer" not in st:
                        st["momentum_buffer"] = upd.clone()
                    else:
                        st["momentum_buffer"].mul_(m).add_(upd)
                    upd = st["momentum_buffer"]
                p.sub_(upd)
                record[f"{g.get('name', 'group')}.{i}"] = f
        self.last_factors = {k: float(v) for k, v in record.items()}  # one sync per step
        return loss


def _safe_ratio(num: torch.Tensor, den: torch.Tensor, w_norm: torch.Tensor,
                g_norm: torch.Tensor, fallback: float) -> torch.Tensor:
    """num/den, but `fallback` where the weight or the gradient norm is 0."""
    ok = (w_norm > 0) & (g_norm > 0)
    return torch.where(ok, num / den.clamp_min(1e-30), torch.full_like(num, fallback))


class LARS(LayerwiseSGD):
    """Layer-wise Adaptive Rate Scaling (You, Gitman & Ginsburg 2017)."""

    def factors(self) -> list[list[torch.Tensor | float]]:
        out = []
        for g in self.param_groups:
            eta, wd = g["trust_coefficient"], g["weight_decay"]
            fs: list[torch.Tensor | float] = []
            for p in g["params"]:
                if p.grad is None:
                    fs.append(1.0)
                    continue
                wn, gn = p.norm(), p.grad.norm()
                fs.append(_safe_ratio(eta * wn, gn + wd * wn, wn, gn, eta))
            out.append(fs)
        return out


class MCLR(LayerwiseSGD):
    """Median-curvature lr: factor_l = median_j(kappa_j) / kappa_l per layer, kappa_l =
    median_i |g_i| / |w_i| over the layer's weight matrix."""

    def factors(self) -> list[list[torch.Tensor | float]]:
        kappas: dict[str, float] = {}
        for g in self.param_groups:
            w = next((p for p in g["params"] if p.ndim >= 2 and p.grad is not None), None)
            if w is not None:
                ratio = w.grad.abs() / w.abs().clamp_min(1e-12)
                kappas[g.get("name", "")] = float(ratio.flatten().median())
        scale = curvature_factors(kappas)
        self.curvatures = kappas
        return [[scale.get(g.get("name", ""), 1.0)] * len(g["params"])
                for g in self.param_groups]


class CBLR(LayerwiseSGD):
    """Curvature-based lr: factor_l = median_j(lambda_j) / lambda_l, with lambda_l the top
    eigenvalue of layer l's Hessian block, refreshed every `curvature_every` steps."""

    def __init__(self, groups: list[dict[str, Any]], lr: float, momentum: float = 0.0,
                 weight_decay: float = 0.0, curvature_every: int = 100,
                 curvature_samples: int = 256, lanczos_steps: int = 8, seed: int = 0) -> None:
        super().__init__(groups, lr, momentum, weight_decay)
        self.curvature_every = curvature_every
        self.curvature_samples = curvature_samples
        self.lanczos_steps = lanczos_steps
        self.seed = seed
        self.curvatures: dict[str, float] = {}
        self.last_residuals: dict[str, float] = {}
        self._scale: dict[str, float] = {}

    def on_step_begin(self, model: nn.Module, xb: torch.Tensor, yb: torch.Tensor,
                      step: int) -> None:
        if step % self.curvature_every != 0 and self._scale:
            return
        from batchlab.measure.curvature import hessian_eigenvalues

        n = min(len(yb), self.curvature_samples)
        res = hessian_eigenvalues(model, (xb[:n].detach(), yb[:n]), per_layer=True,
                                  method="lanczos", tol=1e-2, max_iter=self.lanczos_steps,
                                  seed=self.seed + step, on_fail="ignore")
        lam = {name: r.top for name, r in res.items()}
        self.curvatures = lam
        self.last_residuals = {name: r.residuals[0] for name, r in res.items()}
        self._scale = curvature_factors(lam)

    def factors(self) -> list[list[torch.Tensor | float]]:
        return [[self._scale.get(g.get("name", ""), 1.0)] * len(g["params"])
                for g in self.param_groups]


def curvature_factors(lam: dict[str, float]) -> dict[str, float]:
    """median(lambda) / lambda_l with lambda floored at 1e-3 max(lambda) (see module doc)."""
    vals = [v for v in lam.values() if math.isfinite(v)]
    if not vals or max(vals) <= 0:
        return {k: 1.0 for k in lam}
    floor = 1e-3 * max(vals)
    fl = {k: max(v, floor) if math.isfinite(v) else floor for k, v in lam.items()}
    med = float(torch.tensor(list(fl.values())).median())
    return {k: med / v for k, v in fl.items()}


@register("lars")
def _lars(cfg: Any, groups: list[dict[str, Any]]) -> torch.optim.Optimizer:
    return LARS(groups, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                trust_coefficient=cfg.trust_coefficient)


@register("mclr")
def _mclr(cfg: Any, groups: list[dict[str, Any]]) -> torch.optim.Optimizer:
    return MCLR(groups, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)


@register("cblr")
def _cblr(cfg: Any, groups: list[dict[str, Any]]) -> torch.optim.Optimizer:
    return CBLR(groups, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                curvature_every=cfg.curvature_every, seed=cfg.seed)
