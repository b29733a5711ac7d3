"""Hessian queries on a model and a data set: top eigenvalues (Lanczos or power iteration),
Hutchinson's trace and the stochastic-Lanczos-quadrature spectral density.

Determinism: random vectors come from a `torch.Generator` seeded by `seed`, drawn in the same
order however many probes share a pass, so batching changes nothing but rounding.
Non-convergence is never returned as a bare number: results carry `converged` and the
residuals, and `on_fail="raise"` turns it into `ConvergenceError`.
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from batchlab.errors import BatchlabError, ConfigError
from batchlab.measure.curvature.krylov import (
    error_bounds,
    lanczos,
    lanczos_many,
    power_iteration,
    rademacher,
    ritz,
)
from batchlab.measure.curvature.objective import DEFAULT_MEMORY, Criterion, Data, Objective
from batchlab.measure.curvature.trace import (
    TraceResult,
    check_adaptive,
    hutchinson,
    hutchinson_adaptive,
    hutchpp,
)
from batchlab.measure.layers import parameter_blocks

DataArg = Data | Iterable[Data]


class ConvergenceError(BatchlabError):
    """An iterative method did not reach its tolerance within its iteration budget."""


def in_eval_mode(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Curvature is that of the deterministic function the model computes at evaluation
    (BatchNorm with running statistics, no dropout); the model's mode is restored after."""

    @functools.wraps(fn)
    def wrapper(model: nn.Module, *args: Any, **kw: Any) -> Any:
        was = model.training
        model.eval()
        try:
            return fn(model, *args, **kw)
        finally:
            model.train(was)

    return wrapper


# ----------------------------------------------------------------------------- eigenvalues
@dataclass
class EigenResult:
    """Top eigenvalues (descending) with their residual norms ||H v - lambda v||."""

    eigenvalues: list[float]
    residuals: list[float]
    converged: bool
    n_hvp: int
    iterations: int
    method: str
    eigenvectors: list[torch.Tensor] | None = None
    error_bounds: list[float] = field(default_factory=list)
    history: list[float] = field(default_factory=list)  # top estimate after each iteration

    @property
    def top(self) -> float:
        return self.eigenvalues[0]


def top_eigenvalues(obj: Objective, k: int, method: str = "lanczos", tol: float = 1e-3,
                    max_iter: int = 100, seed: int = 0, return_vectors: bool = False,
                    on_fail: str = "warn", rule: str = "bound") -> EigenResult:
    """Top-k eigenvalues of `obj`'s Hessian (see `hessian_eigenvalues`); `rule` is Lanczos's
    stopping rule ("bound" or PyHessian's "change", see `krylov`)."""
    if k < 1:
        raise ConfigError(f"k must be at least 1, got {k}")
    if k > obj.dim:
        raise ConfigError(f"k={k} is larger than the number of parameters ({obj.dim})")
    if tol <= 0 or max_iter < 1:
        raise ConfigError("tol must be > 0 and max_iter >= 1")
    if on_fail not in ("warn", "raise", "ignore"):
        raise ConfigError("on_fail must be warn, raise or ignore")
    gen = torch.Generator().manual_seed(seed)
    v0 = rademacher(obj.dim, gen, obj.theta)
    start = obj.n_hvp
    if method == "lanczos":
        steps = max(max_iter, k + 1)
        alpha, beta, Q, hist, b_next = lanczos(obj.hvp, v0, steps, k=k, tol=tol, rule=rule)
        values, s = ritz(alpha, beta)
        m = len(alpha)
        order = np.argsort(values)[::-1][:k]
        vals = [float(values[i]) for i in order]
        res = [float(abs(b_next * s[-1, i])) for i in order]
        bounds = [float(b) for b in error_bounds(values, s, b_next, k)]
        converged = all(bd <= tol * max(abs(v), 1e-30) for bd, v in zip(bounds, vals)) or (
            m == obj.dim)
        if rule == "change":  # PyHessian's meaning: it stopped on the change of the estimates
            converged = converged or m < steps
        vecs = ([(Q.T @ torch.as_tensor(s[:, i], dtype=Q.dtype)) for i in order]
                if return_vectors else None)
        result = EigenResult(vals, res, converged, obj.n_hvp - start, m, method, vecs, bounds,
                             hist)
    elif method == "power":
        starts = [v0] + [rademacher(obj.dim, gen, obj.theta) for _ in range(k - 1)]
        vals, res, vecs, ok, its, hist = power_iteration(obj.hvp, starts, k, tol, max_iter)
        order = np.argsort(vals)[::-1]
        result = EigenResult([vals[i] for i in order], [res[i] for i in order], ok,
                             obj.n_hvp - start, its, method,
                             [vecs[i] for i in order] if return_vectors else None,
                             [res[i] for i in order], hist)
    else:
        raise ConfigError(f"unknown method {method!r}; use lanczos or power")
    if not result.converged:
        msg = (f"{method} did not converge in {result.iterations} iterations: residuals "
               f"{', '.join(f'{r:.3g}' for r in result.residuals)} for eigenvalues "
               f"{', '.join(f'{v:.6g}' for v in result.eigenvalues)} (tol {tol:g})")
        if on_fail == "raise":
            raise ConvergenceError(msg)
        if on_fail == "warn":
            warnings.warn(msg, RuntimeWarning, stacklevel=3)
    return result


@in_eval_mode
def hessian_eigenvalues(model: nn.Module, data: DataArg, k: int = 1, *, method: str = "lanczos",
                        tol: float = 1e-3, max_iter: int = 100, batch_size: int | None = None,
                        per_layer: bool = False, return_vectors: bool = False, seed: int = 0,
                        on_fail: str = "warn", criterion: Criterion | None = None,
                        memory_budget: int = DEFAULT_MEMORY) -> EigenResult | dict[str, EigenResult]:
    """Top-k (largest algebraic) Hessian eigenvalues of the mean loss over `data`.

    method: "lanczos" (default; full reorthogonalization, stops when the error bound is below
    `tol` relative) or "power" (with deflation; stops when the residual is below `tol` relative;
    converges to the largest-magnitude eigenvalue). `max_iter` bounds the iterations (= Hessian-
    vector products). `batch_size` = samples per chunk of the product (default: the memory rule
    of `objective`). `per_layer=True` returns {layer name: result} for each diagonal block (the
    Hessian of the loss in that layer's parameters with the others fixed). `on_fail`: "warn"
    (default), "raise" (ConvergenceError) or "ignore"; the result always carries `converged`
    and residuals. `criterion`: the loss (default NLL of log-probabilities).
    """
    if per_layer:
        out = {}
        for name, names in parameter_blocks(model).items():
            obj = Objective(model, data, criterion=criterion, names=names, batch_size=batch_size,
                            memory_budget=memory_budget)
            out[name] = top_eigenvalues(obj, k, method, tol, max_iter, seed, return_vectors,
                                        on_fail)
        return out
    obj = Objective(model, data, criterion=criterion, batch_size=batch_size,
                    memory_budget=memory_budget)
    return top_eigenvalues(obj, k, method, tol, max_iter, seed, return_vectors, on_fail)


# ----------------------------------------------------------------------------- trace
@in_eval_mode
def hessian_trace(model: nn.Module, data: DataArg, *, n_samples: int = 100, seed: int = 0,
                  batch_size: int | None = None, probes_per_pass: int | None = None,
                  tol: float | None = None, criterion: Criterion | None = None,
                  memory_budget: int = DEFAULT_MEMORY, method: str = "hutchinson",
                  rtol: float | None = None, max_hvp: int = 10_000, confidence: float = 0.95,
                  block: int = 8) -> TraceResult:
    """Hutchinson's estimator tr(H) = E[z^T H z], z Rademacher; returns the mean over
    `n_samples` probes (fewer if `tol` stops it, PyHessian's rule) and its standard error
    (sd / sqrt(n)). `probes_per_pass` probes share one double backward (default: the
    measured choice of `objective`); the probes, hence the estimate, do not depend on it.

    With `rtol` (or method="hutch++", whose default rtol is 0.01) the probes stop instead when
    the `confidence` t interval is within rtol of the estimate (t_{n-1} se <= rtol |estimate|,
    first checked after 2 blocks of probes; `trace._probe_rounds`) or after `max_hvp` products
    (`converged` False): method "hutchinson" (`hutchinson_adaptive`) or "hutch++" (`hutchpp`:
    exact trace of a grown low-rank sketch plus Hutchinson on the rest, fewer products for the
    same accuracy when a few eigenvalues dominate)."""
    if method not in ("hutchinson", "hutch++"):
        raise ConfigError(f"unknown trace method {method!r}; use hutchinson or hutch++")
    if method == "hutch++" or rtol is not None:
        check_adaptive(0.01 if rtol is None else rtol, max_hvp, confidence, block)
        obj = Objective(model, data, criterion=criterion, batch_size=batch_size,
                        memory_budget=memory_budget, probes_per_pass=probes_per_pass)
        fn = hutchpp if method == "hutch++" else hutchinson_adaptive
        return fn(obj, 0.01 if rtol is None else rtol, max_hvp, seed, confidence, block)
    if n_samples < 2:
        raise ConfigError("n_samples must be at least 2 (the standard error needs two)")
    obj = Objective(model, data, criterion=criterion, batch_size=batch_size,
                    memory_budget=memory_budget, probes_per_pass=probes_per_pass)
    vals = hutchinson(obj, n_samples, seed, tol)
    a = np.asarray(vals)
    se = float(a.std(ddof=1) / math.sqrt(len(a))) if len(a) > 1 else math.nan
    return TraceResult(float(a.mean()), se, len(a), vals, obj.n_hvp)


# ----------------------------------------------------------------------------- density
@dataclass
class SpectralDensity:
    """`nodes`/`weights`: one quadrature rule per row (each row's weights sum to 1); `mass`:
    the share of the spectral measure each row carries (None: equal shares). With deflation
    row 0 is the Krylov block's Ritz values (uniform weights), the rest the complement's SLQ
    runs; `w1_bound` then bounds the Wasserstein-1 error the split adds (see
    `spectral_density`)."""

    grid: np.ndarray
    density: np.ndarray
    nodes: np.ndarray  # Ritz values, one row per probe vector
    weights: np.ndarray  # quadrature weights (each row sums to 1)
    sigma: float
    mass: np.ndarray | None = None
    deflated: int = 0
    w1_bound: float = 0.0

    def measure(self) -> tuple[np.ndarray, np.ndarray]:
        """(atoms, probabilities) of the estimated spectral measure, before smoothing."""
        rows = self.nodes.shape[0]
        mass = self.mass if self.mass is not None else np.full(rows, 1.0 / rows)
        ok = ~np.isnan(self.nodes)
        return self.nodes[ok], (self.weights * mass[:, None])[ok]


def slq_nodes(obj: Objective, n_vectors: int, n_steps: int, seed: int = 0,
              project: Callable[[torch.Tensor], torch.Tensor] | None = None,
              gen: torch.Generator | None = None) -> list[tuple[np.ndarray, np.ndarray]]:
    """(Ritz values, weights) of `n_vectors` Lanczos runs from Rademacher starts, run in lock
    step (their products batched) in groups whose bases fit the memory budget. `project`
    (deflation) maps vectors onto a subspace: starts and products are projected, so the runs
    see the operator P H P restricted to it."""
    gen = gen if gen is not None else torch.Generator().manual_seed(seed)
    starts = torch.stack([rademacher(obj.dim, gen, obj.theta) for _ in range(n_vectors)])
    matmat = obj.hvp_many
    if project is not None:
        starts = project(starts)
        matmat = lambda V: project(obj.hvp_many(project(V)))  # noqa: E731
    basis_bytes = min(n_steps, obj.dim) * obj.dim * obj.theta.element_size()
    per_group = max(1, int(obj.budget // max(basis_bytes, 1)))
    out = []
    for group in starts.split(per_group):
        for alpha, beta in lanczos_many(matmat, group, n_steps):
            values, s = ritz(alpha, beta)
            out.append((values, s[0, :] ** 2))
    return out


def deflated_slq(obj: Objective, n_vectors: int, n_steps: int, deflate: int, seed: int = 0,
                 ) -> tuple[list[np.ndarray], list[np.ndarray], np.ndarray, int, float]:
    """Krylov-deflated SLQ: (nodes, weights, mass per row, block size k, W1 bound).

    Why: plain SLQ weights each Ritz value by a random (v^T u_i)^2, so the few outlying
    eigenvalues that carry most of sum |lambda| come with a relative weight error of order one
    per probe; at 6k parameters 64 probes x 40 steps were still ~9% of mean |lambda| off in
    Wasserstein-1 (benchmarks/curvature.py --density-accuracy). Here one Lanczos run of
    `deflate` steps spans a Krylov block Q that holds the outliers; its Ritz values enter
    exactly, weight 1/n each, and the SLQ probes run on the complement (I - QQ^T) H (I - QQ^T),
    which no longer has them. The split is not an approximation that needs converged
    eigenvectors: in the basis [Q, Q_perp] H differs from blockdiag(T, Q_perp^T H Q_perp) only
    by the rank-2 coupling beta_{k+1} (q_{k+1} e_k^T + transpose), whose trace norm is
    2 beta_{k+1}, so by Lidskii's inequality the spectral measures are within
    2 beta_{k+1} / n in Wasserstein-1 (returned as the bound)."""
    gen = torch.Generator().manual_seed(seed)
    v0 = rademacher(obj.dim, gen, obj.theta)
    alpha, beta, Q, _, b_next = lanczos(obj.hvp, v0, min(deflate, obj.dim))
    k = len(alpha)
    values = ritz(alpha, beta)[0]
    nodes, weights = [values], [np.full(k, 1.0 / k)]
    mass = [k / obj.dim]
    if k < obj.dim and n_vectors:
        def project(V: torch.Tensor) -> torch.Tensor:
            for _ in range(2):  # twice is enough (Kahan) in floating point
                V = V - (V @ Q.T) @ Q
            return V

        runs = slq_nodes(obj, n_vectors, min(n_steps, obj.dim - k), seed, project, gen)
        nodes += [r for r, _ in runs]
        weights += [w for _, w in runs]
        mass += [(obj.dim - k) / obj.dim / n_vectors] * len(runs)
    else:
        mass[0] = 1.0
    return nodes, weights, np.asarray(mass), k, 2 * float(b_next) / obj.dim


@in_eval_mode
def spectral_density(model: nn.Module, data: DataArg, *, n_vectors: int = 1, n_steps: int = 80,
                     n_grid: int = 1000, sigma: float | None = None, seed: int = 0,
                     batch_size: int | None = None, criterion: Criterion | None = None,
                     memory_budget: int = DEFAULT_MEMORY, deflate: int = 0) -> SpectralDensity:
    """Eigenvalue density by stochastic Lanczos quadrature (Ghorbani et al., PyHessian): for
    each Rademacher probe, `n_steps` Lanczos steps give nodes (Ritz values) and weights (squared
    first components of the Ritz vectors); the density is their Gaussian-smoothed average.
    `sigma` defaults to 1% of the spectral range. The density integrates to 1 over the grid,
    which spans the nodes +- 5 sigma.

    `deflate` = k > 0: first a k-step Lanczos block taken exactly, then the probes on its
    complement (`deflated_slq`): k + n_vectors * n_steps products, and at equal products a far
    smaller distance to the true density when a few outlying eigenvalues dominate, as in
    trained networks (measured: benchmarks/curvature.py --density-accuracy)."""
    if n_vectors < 1 or n_steps < 1:
        raise ConfigError("n_vectors and n_steps must be at least 1")
    if deflate < 0:
        raise ConfigError(f"deflate must be >= 0, got {deflate}")
    obj = Objective(model, data, criterion=criterion, batch_size=batch_size,
                    memory_budget=memory_budget)
    if deflate:
        nodes, weights, mass, k, bound = deflated_slq(obj, n_vectors, n_steps, deflate, seed)
        d = smooth_density(nodes, weights, n_grid, sigma, mass)
        d.deflated, d.w1_bound = k, bound
        return d
    runs = slq_nodes(obj, n_vectors, n_steps, seed)
    return smooth_density([r for r, _ in runs], [w for _, w in runs], n_grid, sigma)


def smooth_density(nodes: Sequence[np.ndarray], weights: Sequence[np.ndarray], n_grid: int,
                   sigma: float | None, mass: np.ndarray | None = None) -> SpectralDensity:
    """The Gaussian-smoothed mixture of the runs' quadrature rules on a grid, run i carrying
    mass[i] of the measure (default: equal shares)."""
    n_vectors = len(nodes)
    share = np.full(n_vectors, 1.0 / n_vectors) if mass is None else np.asarray(mass, float)
    m = max(len(r) for r in nodes)
    N = np.full((n_vectors, m), np.nan)
    W = np.zeros((n_vectors, m))
    for i, (r, w) in enumerate(zip(nodes, weights)):
        N[i, : len(r)], W[i, : len(w)] = r, w
    lo, hi = float(np.nanmin(N)), float(np.nanmax(N))
    sig = sigma if sigma is not None else max(0.01 * (hi - lo), 1e-12)
    grid = np.linspace(lo - 5 * sig, hi + 5 * sig, n_grid)
    dens = np.zeros_like(grid)
    for r, w, c in zip(nodes, weights, share):
        dens += c * (w[None, :] * np.exp(-((grid[:, None] - r[None, :]) ** 2)
                                         / (2 * sig**2))).sum(1)
    dens /= sig * math.sqrt(2 * math.pi)
    return SpectralDensity(grid, dens, N, W, sig, None if mass is None else share)


def wasserstein1(atoms_a: np.ndarray, p_a: np.ndarray, atoms_b: np.ndarray,
                 p_b: np.ndarray) -> float:
    """Wasserstein-1 distance between two discrete measures on the line (each normalized to
    total mass 1): the integral of |F_a - F_b|, the area between their CDFs. It bounds the same
    distance between their Gaussian-smoothed densities (smoothing both by one kernel cannot
    increase it), so it judges a spectral density estimate before any choice of sigma."""
    x = np.concatenate([np.asarray(atoms_a, float), np.asarray(atoms_b, float)])
    w = np.concatenate([np.asarray(p_a, float) / np.sum(p_a), -np.asarray(p_b, float) / np.sum(p_b)])
    order = np.argsort(x, kind="stable")
    x, w = x[order], w[order]
    return float(np.sum(np.abs(np.cumsum(w)[:-1]) * np.diff(x)))
