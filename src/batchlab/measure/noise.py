"""Gradient noise scale (McCandlish et al., "An Empirical Model of Large-Batch Training").

With per-example gradients g_i, true gradient G = E[g_i] and per-example covariance Sigma:

* B_simple = tr(Sigma) / |G|^2, the batch size at which the gradient noise of a batch is as
  large as the gradient itself. It predicts the critical batch size when the Hessian is
  well-conditioned, and it needs no Hessian.
* B_noise = tr(H Sigma) / (G^T H G), the same with the curvature H as the metric.

Three estimators, all for "any nn.Module + a loss on its outputs":

1. `b_simple` - from per-example gradients. Only their squared norms |g_i|^2 and sums are
   needed: the norms come from `torch.func.vmap(grad(...))` over `functional_call` (chunked so
   memory stays bounded, any model) or, for models built only of nn.Linear layers, exactly and
   far cheaper from the layer inputs and output-gradients; sums of gradients are ordinary
   backward passes. From n examples: the sample covariance
   trace tr(S) = (sum |g_i|^2 - n |g_bar|^2) / (n - 1) is unbiased for tr(Sigma), and because
   E|g_bar|^2 = |G|^2 + tr(Sigma)/n, |G|^2 is estimated as |g_bar|^2 - tr(S)/n (unbiased).
   The confidence interval is a percentile bootstrap that resamples examples. Resampling needs
   all pairwise dot products g_i . g_j; for big models n x P floats do not fit, so examples are
   grouped into at most `max_groups` random blocks whose gradient sums (one backward each) are
   kept, and blocks are
   resampled (a block of iid examples is itself an iid draw, so this is the same bootstrap at a
   coarser grain; with small models every example is its own block).
2. `b_simple_two_batch` - McCandlish's appendix A, no per-example gradients: a big batch of
   B_big examples is split into k = B_big / B_small disjoint small batches (the data-parallel
   picture); |G_small|^2 is averaged over the small batches, |G_big|^2 is the norm of their mean.
   Since E|G_B|^2 = |G|^2 + tr(Sigma)/B,
       |G|^2 ~ (B_big |G_big|^2 - B_small |G_small|^2) / (B_big - B_small)
       tr(Sigma) ~ (|G_small|^2 - |G_big|^2) / (1/B_small - 1/B_big)
   are unbiased; numerator and denominator are averaged over many big batches before dividing
   (the ratio of averages, as the paper does); the CI bootstraps over big batches.
3. `b_noise` - with Hessian-vector products (forward-over-reverse, `jvp` of `grad`) of the mean
   loss on a separate Hessian batch. For per-example gradients g_i (i = 1..n) with mean g_bar,
   E[g_i^T H g_i] = G^T H G + tr(H Sigma) and E[g_bar^T H g_bar] = G^T H G + tr(H Sigma)/n, so
       tr(H Sigma) ~ n/(n-1) (mean_i g_i^T H g_i - g_bar^T H g_bar)
       G^T H G     ~ g_bar^T H g_bar - tr(H Sigma)/n
   (H is held fixed - estimated on its own batch - so these are unbiased given H). One HVP per
   example makes it the expensive one: use a few dozen examples. (The HVP is the same
   forward-over-reverse primitive as `batchlab.measure.curvature`'s, here vmapped over a chunk of
   vectors and generic in the loss, so the closed-form regression test can use squared error.) It also gives the greedy
   optimal step for the noiseless gradient, eps_max = |G|^2 / (G^T H G), and the paper's optimal
   learning rate at batch B, eps_opt(B) = eps_max / (1 + B_noise / B).

Models with BatchNorm are evaluated in eval mode for per-example gradients (a batch of one has
no batch statistics), so their noise scale is that of the running-statistics network.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""(model outputs for a batch, targets) -> mean loss (a 0-d tensor)."""


def default_loss(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Cross-entropy on the outputs: for batchlab's MLPs (which return log-probabilities) this
    equals their NLL, since log_softmax is idempotent; for models returning logits it is the
    usual cross-entropy."""
    return F.cross_entropy(out, y)


@dataclass
class NoiseEstimate:
    """A noise-scale estimate with its parts and a bootstrap confidence interval."""

    b_simple: float
    grad_sq: float  # |G|^2 (unbiased estimate)
    trace_sigma: float  # tr(Sigma) (unbiased estimate)
    n: int  # examples used (per-example) or big batches (two-batch)
    ci: tuple[float, float]
    method: str
    level: float = 0.95

    def to_json(self) -> dict:
        d = asdict(self)
        d["ci"] = [finite_or_none(c) for c in self.ci]
        for k in ("b_simple", "grad_sq", "trace_sigma"):
            d[k] = finite_or_none(d[k])
        return d


def finite_or_none(v: float) -> float | None:
    return float(v) if v is not None and math.isfinite(v) else None


def safe_ratio(num: np.ndarray | float, den: np.ndarray | float) -> np.ndarray:
    """tr(Sigma)/|G|^2 where an estimated |G|^2 <= 0 means "noise dominates": +inf."""
    num, den = np.asarray(num, dtype=float), np.asarray(den, dtype=float)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(den > 0, num / np.where(den > 0, den, 1.0), np.inf)


def percentile_ci(values: np.ndarray, level: float) -> tuple[float, float]:
    """Order-statistic percentile interval (works with +inf entries, unlike interpolation)."""
    v = np.sort(values)
    if v.size == 0:
        return (math.nan, math.nan)
    lo = v[int(math.floor((1 - level) / 2 * (v.size - 1)))]
    hi = v[int(math.ceil((1 + level) / 2 * (v.size - 1)))]
    return (float(lo), float(hi))


# -- per-example gradients ------------------------------------------------------------------
def model_state(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    params = {k: v.detach() for k, v in model.named_parameters() if v.requires_grad}
    buffers = {k: v.detach() for k, v in model.named_buffers()}
    return params, buffers


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def auto_chunk(model: nn.Module, budget_bytes: int = 64 << 20) -> int:
    """Examples per vmap chunk so one chunk of flat per-example gradients fits the budget."""
    return int(max(1, min(256, budget_bytes // (4 * max(n_params(model), 1)))))


class EvalMode:
    """Put a model in eval mode for the duration (per-example BatchNorm has no batch stats)."""

    def __init__(self, model: nn.Module) -> None:
        self.model, self.was = model, model.training

    def __enter__(self) -> nn.Module:
        self.model.eval()
        return self.model

    def __exit__(self, *exc: object) -> None:
        self.model.train(self.was)


def _per_example_grad_fn(model: nn.Module, loss_fn: LossFn
                         ) -> tuple[Callable[..., dict[str, torch.Tensor]], dict[str, torch.Tensor]]:
    """(g_fn, params): g_fn(params, xs, ys) gives every example's gradient as a dict of
    [c, *shape] tensors, by `vmap(grad(loss of one example))` over `functional_call`."""
    params, buffers = model_state(model)

    def loss_one(p: dict[str, torch.Tensor], xi: torch.Tensor, yi: torch.Tensor) -> torch.Tensor:
        out = functional_call(model, (p, buffers), (xi.unsqueeze(0),))
        return loss_fn(out, yi.unsqueeze(0))

    return vmap(grad(loss_one), in_dims=(None, 0, 0)), params


def per_example_grads(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *,
                      loss_fn: LossFn = default_loss, chunk: int | None = None
                      ) -> Iterator[torch.Tensor]:
    """Yield flat per-example gradients, one [c, P] tensor per chunk of c examples, in order.

    `vmap(grad(loss of one example))` over `functional_call`: one batched computation instead
    of c backward passes (see benchmarks/noise_scale.py for the speed-up).
    """
    g_fn, params = _per_example_grad_fn(model, loss_fn)
    chunk = chunk or auto_chunk(model)
    with EvalMode(model):
        for xs, ys in zip(x.split(chunk), y.split(chunk)):
            gs = g_fn(params, xs, ys)
            yield torch.cat([g.reshape(len(xs), -1) for g in gs.values()], dim=1)


def per_example_grads_loop(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *,
                           loss_fn: LossFn = default_loss) -> torch.Tensor:
    """Reference implementation: one autograd backward per example, [n, P]. Slow; for tests
    and the benchmark."""
    params = [p for p in model.parameters() if p.requires_grad]
    rows = []
    with EvalMode(model):
        for i in range(len(x)):
            loss = loss_fn(model(x[i : i + 1]), y[i : i + 1])
            gs = torch.autograd.grad(loss, params)
            rows.append(torch.cat([g.reshape(-1) for g in gs]))
    return torch.stack(rows)


def full_grad(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *,
              loss_fn: LossFn = default_loss) -> torch.Tensor:
    """Flat gradient of the mean loss on (x, y) in the model's current mode."""
    params = [p for p in model.parameters() if p.requires_grad]
    loss = loss_fn(model(x), y)
    return torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params)])


# -- B_simple from per-example gradients ----------------------------------------------------
def per_example_sq_norms(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *,
                         loss_fn: LossFn = default_loss, chunk: int | None = None,
                         method: str = "auto") -> torch.Tensor:
    """|g_i|^2 for every example, float64 [n].

    "vmap": per-example gradients by `vmap(grad)`, each reduced to its squared norm per
    parameter tensor right away (no flat [c, P] copy). "linear": exact and much cheaper for
    models whose trainable parameters all sit in `nn.Linear` layers applied to [batch, features]
    inputs (batchlab's MLP): the gradient of example i w.r.t. a layer's weight is the outer
    product delta_i h_i^T, so |grad W|^2 = |delta_i|^2 |h_i|^2 and |grad b|^2 = |delta_i|^2
    (Goodfellow's trick; inputs and output-gradients from hooks, one forward/backward per
    chunk). "auto" = "linear" where it applies, else "vmap". `loss_fn` must be a mean of
    per-example losses (so that per-example gradients are the batch gradient times B)."""
    if method == "auto":
        method = "linear" if linear_only(model) else "vmap"
    if method == "linear":
        return _sq_norms_linear(model, x, y, loss_fn=loss_fn, chunk=chunk or 1024)
    if method != "vmap":
        raise ValueError(f"unknown per-example method {method!r}; use auto, vmap or linear")
    g_fn, params = _per_example_grad_fn(model, loss_fn)
    chunk = chunk or auto_chunk(model)
    out = []
    with EvalMode(model):
        for xs, ys in zip(x.split(chunk), y.split(chunk)):
            gs = g_fn(params, xs, ys)
            sq = sum(torch.linalg.vector_norm(g.reshape(len(xs), -1), dim=1).double() ** 2
                     for g in gs.values())
            out.append(sq)
    return torch.cat(out).cpu()


def linear_only(model: nn.Module) -> bool:
    """True when every trainable parameter belongs to an nn.Linear (the "linear" fast path)."""
    lin = {id(p) for m in model.modules() if isinstance(m, nn.Linear) for p in m.parameters()}
    ps = [p for p in model.parameters() if p.requires_grad]
    return bool(ps) and all(id(p) in lin for p in ps)


def _sq_norms_linear(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, loss_fn: LossFn,
                     chunk: int) -> torch.Tensor:
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    inputs: dict[int, torch.Tensor] = {}
    out_grads: dict[int, torch.Tensor] = {}
    hooks = []
    for i, lin in enumerate(linears):
        hooks.append(lin.register_forward_hook(
            lambda m, a, o, i=i: inputs.__setitem__(i, a[0].detach())))
        hooks.append(lin.register_full_backward_hook(
            lambda m, gi, go, i=i: out_grads.__setitem__(i, go[0].detach())))
    res = []
    try:
        with EvalMode(model):
            for xs, ys in zip(x.split(chunk), y.split(chunk)):
                xs = xs.clone().requires_grad_(True)  # full backward hooks need a grad input
                loss = loss_fn(model(xs), ys) * len(xs)  # sum of per-example losses
                torch.autograd.grad(loss, [p for p in model.parameters() if p.requires_grad]
                                    + [xs])
                sq = torch.zeros(len(xs), dtype=torch.float64, device=xs.device)
                for i, lin in enumerate(linears):
                    if inputs[i].dim() != 2:
                        raise ValueError("the linear per-example path needs 2-d layer inputs")
                    d2 = out_grads[i].double().pow(2).sum(1)
                    h2 = inputs[i].double().pow(2).sum(1)
                    sq += d2 * h2 + (d2 if lin.bias is not None else 0.0)
                res.append(sq)
                inputs.clear()
                out_grads.clear()
    finally:
        for h in hooks:
            h.remove()
    return torch.cat(res).cpu()


@dataclass
class _GroupStats:
    """Sufficient statistics for resampling: per-group gradient-sum Gram matrix, per-group sums
    of squared per-example norms, and group sizes (float64 on the host)."""

    gram: np.ndarray  # [m, m] s_k . s_l
    sq: np.ndarray  # [m] sum_{i in k} |g_i|^2
    size: np.ndarray  # [m]


def _estimate(stats: _GroupStats, w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(tr(Sigma), |G|^2) for resampling weights w [R, m] (w = 1: the point estimate)."""
    n = w @ stats.size
    s2 = np.einsum("rk,kl,rl->r", w, stats.gram, w)  # |sum_i g_i|^2
    q = w @ stats.sq
    tr = (q - s2 / n) / np.maximum(n - 1, 1)
    g2 = s2 / n**2 - tr / n
    return tr, g2


def group_stats(model: nn.Module, x: torch.Tensor, y: torch.Tensor, sq_norms: torch.Tensor, *,
                max_groups: int = 256, seed: int = 0, loss_fn: LossFn = default_loss
                ) -> _GroupStats:
    """Resampling statistics: examples go to min(n, max_groups) groups by a seeded random
    permutation; a group's gradient sum is the gradient of its summed loss (one ordinary
    backward per group, no per-example gradients needed)."""
    n = len(x)
    m = max(1, min(n, max_groups))
    gen = torch.Generator().manual_seed(seed)
    perm = torch.randperm(n, generator=gen)
    groups = [g.to(x.device) for g in perm.tensor_split(m)]
    with EvalMode(model):
        sums = torch.stack([full_grad(model, x.index_select(0, g), y.index_select(0, g),
                                      loss_fn=loss_fn) * len(g) for g in groups])
    gram = torch.zeros(m, m, dtype=torch.float64, device=sums.device)
    for blk in sums.split(1 << 20, dim=1):  # float64 Gram without a float64 copy of all sums
        b64 = blk.double()
        gram += b64 @ b64.T
    sq = np.array([float(sq_norms[g.cpu()].sum()) for g in groups])
    size = np.array([len(g) for g in groups], dtype=float)
    return _GroupStats(gram=gram.cpu().numpy(), sq=sq, size=size)


def estimate_from_stats(stats: _GroupStats, *, n_boot: int = 1000, level: float = 0.95,
                        seed: int = 0, method: str = "per-example") -> NoiseEstimate:
    m = len(stats.size)
    tr, g2 = _estimate(stats, np.ones((1, m)))
    b = float(safe_ratio(tr, g2)[0])
    ci = (math.nan, math.nan)
    if n_boot > 0 and m > 1:
        rng = np.random.default_rng(seed)
        w = rng.multinomial(m, np.full(m, 1.0 / m), size=n_boot).astype(float)
        trb, g2b = _estimate(stats, w)
        ci = percentile_ci(safe_ratio(trb, g2b), level)
    return NoiseEstimate(b_simple=b, grad_sq=float(g2[0]), trace_sigma=float(tr[0]),
                         n=int(stats.size.sum()), ci=ci, method=method, level=level)


def b_simple(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *,
             loss_fn: LossFn = default_loss, chunk: int | None = None, n_boot: int = 1000,
             level: float = 0.95, max_groups: int | None = None, seed: int = 0,
             method: str = "auto") -> NoiseEstimate:
    """B_simple = tr(Sigma)/|G|^2 from the per-example gradients of (x, y), with a bootstrap CI.

    `max_groups` bounds the resampling blocks (default: as many gradient sums as fit in about
    256 MB, at most 256; every example is its own block when n is at most that). `method`
    picks how per-example squared norms are computed (see `per_example_sq_norms`)."""
    n = len(x)
    if n < 2:
        raise ValueError("B_simple needs at least 2 examples")
    if n_boot <= 0:
        max_groups = 1  # no resampling: one backward for the mean gradient is enough
    elif max_groups is None:
        max_groups = int(max(8, min(256, (256 << 20) // (4 * max(n_params(model), 1)))))
    sq = per_example_sq_norms(model, x, y, loss_fn=loss_fn, chunk=chunk, method=method)
    stats = group_stats(model, x, y, sq, max_groups=max_groups, seed=seed, loss_fn=loss_fn)
    used = "linear" if method == "auto" and linear_only(model) else method
    used = "vmap" if used == "auto" else used
    return estimate_from_stats(stats, n_boot=n_boot, level=level, seed=seed,
                               method=f"per-example ({used})")


# -- averaging over iterates ----------------------------------------------------------------
def averaged(points: list[tuple[float, float]], *, n_boot: int = 1000, level: float = 0.95,
             seed: int = 0, method: str = "averaged over iterates") -> NoiseEstimate:
    """B_simple as mean(tr(Sigma)) / mean(|G|^2) over measurements (trace, grad_sq) taken at
    several iterates, with a bootstrap CI over the iterates.

    Why: the full-batch gradient at one SGD iterate fluctuates strongly from step to step (the
    iterate bounces along high-curvature directions), so a single-point |G|^2 - and B_simple -
    swings by an order of magnitude; McCandlish et al. average |G|^2 and tr(Sigma) over steps
    before taking the ratio, which is what this does."""
    a = np.asarray([(t, g) for t, g in points if math.isfinite(t) and math.isfinite(g)], float)
    if len(a) == 0:
        return NoiseEstimate(math.nan, math.nan, math.nan, 0, (math.nan, math.nan), method, level)
    tr, g2 = a[:, 0], a[:, 1]
    ci = (math.nan, math.nan)
    if n_boot > 0 and len(a) > 1:
        rng = np.random.default_rng(seed)
        w = rng.multinomial(len(a), np.full(len(a), 1.0 / len(a)), size=n_boot).astype(float)
        ci = percentile_ci(safe_ratio(w @ tr, w @ g2), level)
    return NoiseEstimate(b_simple=float(safe_ratio(tr.mean(), g2.mean())), grad_sq=float(g2.mean()),
                         trace_sigma=float(tr.mean()), n=len(a), ci=ci, method=method,
                         level=level)
