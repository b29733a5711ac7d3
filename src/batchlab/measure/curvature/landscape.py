"""The loss landscape around a point: Keskar et al.'s epsilon-sharpness (a box maximization)
and the 1-D interpolation between two solutions. Only losses and gradients, no Hessian."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.func import functional_call

from batchlab.errors import ConfigError
from batchlab.measure.curvature.hessian import in_eval_mode
from batchlab.measure.curvature.objective import (
    DEFAULT_CHUNK,
    Criterion,
    Data,
    Objective,
    check_log_probs,
    check_pair,
    nll_criterion,
)


@dataclass
class SharpnessResult:
    sharpness: float  # 100 (max f - f(x)) / (1 + f(x))
    loss: float  # f(x)
    max_loss: float
    epsilon: float
    subspace_dim: int | None
    iterations: int
    evaluations: int
    max_iter: int


@in_eval_mode
def sharpness(model: nn.Module, data: Data | Iterable[Data], *, epsilon: float = 1e-3,
              subspace_dim: int | None = None, max_iter: int = 10, seed: int = 0,
              batch_size: int | None = None, criterion: Criterion | None = None
              ) -> SharpnessResult:
    """Keskar et al.'s epsilon-sharpness:
    phi(eps, A) = 100 (max_{y in C_eps} f(x + A y) - f(x)) / (1 + f(x)),
    C_eps = {y : |y_i| <= eps (|(A^+ x)_i| + 1)}.

    Full space: A = I. Random subspace (`subspace_dim` = p): A is an n x p standard-normal matrix
    drawn from `seed` (held in memory: n p floats, 745 MB for the 1.86M-parameter MLP at p=100)
    and A^+ its pseudo-inverse. The inner maximization is inexact, as in Keskar et al.:
    L-BFGS-B (SciPy, box constraints) from y = 0, `max_iter` iterations (default 10, Keskar's
    budget; at most 3 max_iter function evaluations). The maximum over every evaluated point is
    reported, so the result is >= 0."""
    from scipy.optimize import Bounds, minimize

    if not (isinstance(epsilon, (int, float)) and math.isfinite(epsilon) and epsilon > 0):
        raise ConfigError(f"epsilon must be a positive number, got {epsilon}")
    if max_iter < 1:
        raise ConfigError("max_iter must be at least 1")
    obj = Objective(model, data, criterion=criterion, batch_size=batch_size)
    x0 = obj.theta
    f0 = obj.loss(x0)
    if subspace_dim is None:
        A = None
        bound = (epsilon * (x0.abs() + 1)).double().cpu().numpy()
    else:
        if not 1 <= subspace_dim <= obj.dim:
            raise ConfigError(f"subspace_dim must be in [1, {obj.dim}], got {subspace_dim}")
        gen = torch.Generator().manual_seed(seed)
        A = torch.randn(obj.dim, subspace_dim, generator=gen).to(x0)
        # A^+ x = (A^T A)^{-1} A^T x: a p x p solve, never an n x p factorization
        gram = (A.T @ A).double()
        pinv_x = torch.linalg.solve(gram, (A.T @ x0).double())
        bound = (epsilon * (pinv_x.abs() + 1)).cpu().numpy()

    best = [f0]
    nfev = [0]

    def neg(y: np.ndarray) -> tuple[float, np.ndarray]:
        yt = torch.as_tensor(y, dtype=x0.dtype, device=x0.device)
        z = yt if A is None else A @ yt
        f, g = obj.loss_and_grad(x0 + z)
        nfev[0] += 1
        if math.isfinite(f):
            best[0] = max(best[0], f)
        gy = g if A is None else A.T @ g
        return -f, -gy.double().cpu().numpy()

    res = minimize(neg, np.zeros(len(bound)), jac=True, method="L-BFGS-B",
                   bounds=Bounds(-bound, bound),
                   options={"maxiter": max_iter, "maxfun": 3 * max_iter, "ftol": 0.0,
                            "gtol": 0.0})
    fmax = best[0]
    return SharpnessResult(100.0 * (fmax - f0) / (1.0 + f0), f0, fmax, float(epsilon),
                           subspace_dim, int(res.nit), nfev[0], max_iter)


@torch.no_grad()
def interpolate(model_a: nn.Module, model_b: nn.Module, data_train: Data, data_test: Data,
                alphas: Sequence[float] | None = None, batch_size: int | None = None,
                criterion: Criterion | None = None) -> list[dict[str, float]]:
    """Keskar's 1-D parametric plot: train/test loss and accuracy of (1 - a) x_a + a x_b for
    each a in `alphas` (default 25 points on [-1, 2]). Buffers (e.g. BatchNorm statistics) are
    interpolated too."""
    x_train, _ = check_pair(data_train)
    check_pair(data_test)
    if criterion is None:
        check_log_probs(model_a, x_train)
        check_log_probs(model_b, x_train)
    crit = criterion or nll_criterion
    sa, sb = model_a.state_dict(), model_b.state_dict()
    if sa.keys() != sb.keys() or any(sa[k].shape != sb[k].shape for k in sa):
        raise ConfigError("interpolate needs two models of the same architecture")
    alphas = list(np.linspace(-1, 2, 25)) if alphas is None else list(alphas)
    chunk = batch_size or DEFAULT_CHUNK
    rows = []
    was = model_a.training
    model_a.eval()
    try:
        for a in alphas:
            state = {k: (sa[k] * (1 - a) + sb[k] * a) if sa[k].is_floating_point() else sa[k]
                     for k in sa}
            row: dict[str, float] = {"alpha": float(a)}
            for split, (x, y) in (("train", data_train), ("test", data_test)):
                loss = correct = 0.0
                for xb, yb in zip(x.split(chunk), y.split(chunk)):
                    out = functional_call(model_a, state, (xb,))
                    loss += float(crit(out, yb)) * len(yb)
                    correct += float((out.argmax(1) == yb).sum())
                row[f"{split}_loss"] = loss / len(y)
                row[f"{split}_acc"] = correct / len(y)
            rows.append(row)
    finally:
        model_a.train(was)
    return rows
