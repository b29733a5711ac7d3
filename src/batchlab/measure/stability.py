"""How large a learning rate full-batch gradient descent survives from one point: a sweep of
learning rates upward until a run diverges.

On a quadratic with top Hessian eigenvalue lambda, gradient descent without momentum is stable
iff lr < 2 / lambda: the error along the top eigenvector is multiplied by |1 - lr lambda| per
step. The sweep measures the largest stable lr of a real loss from the same starting weights,
so that a caller can put it against 2 / lambda_max measured there (`curvature`).

Divergence rule (`gd_run`): a run diverges when its loss (or gradient) becomes non-finite, or
when its loss exceeds `blowup` x its loss at the start, at any step. Above the quadratic limit
the top mode grows geometrically, so any fixed factor is crossed within a few steps and the
factor barely moves the threshold; a loss that has grown `blowup`-fold over an untrained start
has lost every bit of progress, which is not "training safely" even when it later comes back
down (a catapult). A run that only rises briefly below the factor counts as stable.

Everything here is plain torch on a copy of the model: the model passed in is never changed.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from batchlab.errors import ConfigError
from batchlab.measure.curvature.objective import nll_criterion

Criterion = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class GDRun:
    """One full-batch GD run: `diverged` by the module's rule, after `steps_run` updates (a
    diverging run stops there); the largest and the last loss over the initial loss."""

    lr: float
    diverged: bool
    steps_run: int
    max_loss_ratio: float
    final_loss_ratio: float


@dataclass(frozen=True)
class Bracket:
    """The sweep's answer: `lr_max` = the largest lr below the first diverging one (None when
    even the smallest diverged), `lr_diverged` = that first diverging lr (None when none did).
    `censored` says why the bracket is open: "smallest diverged", or "none diverged" (then
    `lr_max` is the top of the grid, only a lower bound)."""

    lr_max: float | None
    lr_diverged: float | None
    censored: str | None


def log_grid(low: float, high: float, per_octave: int = 4) -> list[float]:
    """The lrs 2^(j / per_octave) (j an integer) in [low, high], ascending. The grid is
    anchored at 1, not at the measured limit, so lr_max x lambda / 2 is not quantized to the
    same grid values for every seed (a grid centred on 2 / lambda would give every seed the
    same ratio, an interval of zero width)."""
    if not (0 < low <= high) or per_octave < 1:
        raise ConfigError(f"an lr grid needs 0 < low <= high and per_octave >= 1, got "
                          f"[{low}, {high}] with {per_octave}")
    j0 = math.ceil(per_octave * math.log2(low) - 1e-9)
    j1 = math.floor(per_octave * math.log2(high) + 1e-9)
    return [2.0 ** (j / per_octave) for j in range(j0, j1 + 1)]


def gd_run(model: nn.Module, data: tuple[torch.Tensor, torch.Tensor], lr: float, steps: int,
           blowup: float = 2.0, criterion: Criterion | None = None) -> GDRun:
    """`steps` updates w <- w - lr grad L(w) of the mean loss over all of `data` (no momentum,
    no weight decay) on a copy of `model` in eval mode (the function whose Hessian the curvature
    code measures); stops at the first step that diverges (module docstring)."""
    if steps < 1 or not blowup > 1:
        raise ConfigError(f"a GD run needs steps >= 1 and blowup > 1, got {steps}, {blowup}")
    crit = criterion or nll_criterion
    net = copy.deepcopy(model).eval()
    params = [p for p in net.parameters() if p.requires_grad]
    x, y = data
    first, worst, loss = math.nan, 1.0, math.nan
    for t in range(steps + 1):
        value = crit(net(x), y)
        loss = float(value.detach())
        if t == 0:
            first = loss
            if not math.isfinite(first) or first <= 0:
                raise ConfigError(f"the loss at the start of the sweep is {first}: the sweep "
                                  "needs a finite positive loss")
        ratio = loss / first
        worst = max(worst, ratio) if math.isfinite(ratio) else math.inf
        if not math.isfinite(loss) or ratio > blowup:
            return GDRun(lr, True, t, worst, ratio if math.isfinite(ratio) else math.inf)
        if t == steps:
            break
        grads = torch.autograd.grad(value, params)
        if not all(bool(torch.isfinite(g).all()) for g in grads):
            return GDRun(lr, True, t, worst, ratio)
        with torch.no_grad():
            for p, g in zip(params, grads):
                p.sub_(lr * g)
    return GDRun(lr, False, steps, worst, loss / first)


def lr_sweep(model: nn.Module, data: tuple[torch.Tensor, torch.Tensor], lrs: Sequence[float],
             steps: int, blowup: float = 2.0, criterion: Criterion | None = None) -> list[GDRun]:
    """`gd_run` at each lr in ascending order from the same weights, stopping after the first
    that diverges: the largest stable lr is the one just below it (`bracket`), so larger lrs
    cannot change the answer and are not run."""
    out: list[GDRun] = []
    for lr in sorted(float(v) for v in lrs):
        out.append(gd_run(model, data, lr, steps, blowup, criterion))
        if out[-1].diverged:
            break
    return out


def bracket(runs: Sequence[GDRun]) -> Bracket:
    """The largest stable lr of an ascending sweep, and whether its bracket is open."""
    stable = []
    for r in sorted(runs, key=lambda r: r.lr):
        if r.diverged:
            if not stable:
                return Bracket(None, r.lr, "smallest diverged")
            return Bracket(stable[-1], r.lr, None)
        stable.append(r.lr)
    return Bracket(stable[-1] if stable else None, None, "none diverged")
