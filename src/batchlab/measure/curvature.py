"""Curvature of the loss surface: Hessian eigenvalues, trace, spectral density, Keskar sharpness
and 1-D interpolation, for any `nn.Module` that returns log-probabilities.

Everything rests on one primitive, the exact Hessian-vector product of the mean NLL over a data
set, computed forward-over-reverse with `torch.func` (`jvp(grad(f))`): one forward+backward with
tangents, no graph kept between products. The data are processed in chunks of `batch_size`
samples and the chunk products summed, so memory is bounded by one chunk's activations plus a
few parameter-sized vectors whatever the data size (a Hessian of the 1.9M-parameter MLP over a
whole training set fits in a few hundred MB).

Why Lanczos: PyHessian gets the top eigenvalue by power iteration, whose error shrinks like
(lambda_2 / lambda_1)^(2t). Lanczos with full reorthogonalization builds the Krylov space of the
same products and extracts its best (Rayleigh-Ritz) estimate, which converges like a Chebyshev
polynomial in the gap: far fewer Hessian-vector products for the same accuracy. It stops on the
standard a-posteriori bound: the residual ||H y - theta y|| = beta_m |s_m| is exact and cheap, and
the eigenvalue error is at most min(r, r^2 / gap) with the gap estimated from the Ritz values.

Determinism: random start vectors come from a `torch.Generator` seeded by `seed`; the products
themselves are deterministic on CPU. Non-convergence is never returned as a bare number: results
carry `converged` and the residuals, and `on_fail="raise"` turns it into `ConvergenceError`.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, jvp

from batchlab.errors import BatchlabError, ConfigError

DEFAULT_CHUNK = 4096
Data = tuple[torch.Tensor, torch.Tensor]


class ConvergenceError(BatchlabError):
    """An iterative method did not reach its tolerance within its iteration budget."""


# ----------------------------------------------------------------------------- the objective
def parameter_blocks(model: nn.Module) -> dict[str, list[str]]:
    """Parameter names grouped per layer, as the layer-wise optimizers see them: one block per
    Linear (weight and bias, plus the norm parameters that follow it), named layer1..layerN."""
    from batchlab.nn.optim import layer_groups

    ids = {id(p): n for n, p in model.named_parameters()}
    return {g["name"]: [ids[id(p)] for p in g["params"]] for g in layer_groups(model)}


class Objective:
    """Mean NLL of `model` over `data` as a function of a flat vector of (some of) its
    parameters; the others are held fixed at their current values.

    `names` selects the parameters that form the vector (all trainable ones by default), so the
    same code gives the full Hessian and any diagonal block of it.
    """

    def __init__(self, model: nn.Module, data: Data, *, names: Sequence[str] | None = None,
                 batch_size: int | None = None) -> None:
        x, y = _check_data(data)
        self.model = model
        self.x, self.y = x, y
        self.n = int(x.shape[0])
        self.chunk = int(batch_size or DEFAULT_CHUNK)
        if self.chunk <= 0:
            raise ConfigError(f"batch_size must be positive, got {batch_size}")
        params = {k: p.detach() for k, p in model.named_parameters() if p.requires_grad}
        self.names = list(names) if names is not None else list(params)
        unknown = [k for k in self.names if k not in params]
        if unknown:
            raise ConfigError(f"unknown parameter names {unknown[:3]}")
        self.fixed = {k: v for k, v in params.items() if k not in self.names}
        self.buffers = {k: b.detach() for k, b in model.named_buffers()}
        self.shapes = [params[k].shape for k in self.names]
        self.numels = [params[k].numel() for k in self.names]
        self.theta = torch.cat([params[k].reshape(-1) for k in self.names])
        self.dim = int(self.theta.numel())
        self.n_hvp = 0

    def _unflatten(self, theta: torch.Tensor) -> dict[str, torch.Tensor]:
        parts = theta.split(self.numels)
        return {k: p.view(s) for k, p, s in zip(self.names, parts, self.shapes)}

    def _chunk_loss(self, theta: torch.Tensor, xb: torch.Tensor, yb: torch.Tensor) -> torch.Tensor:
        params = {**self.fixed, **self._unflatten(theta)}
        out = functional_call(self.model, (params, self.buffers), (xb,))
        return F.nll_loss(out, yb, reduction="sum")

    def _chunks(self):
        return zip(self.x.split(self.chunk), self.y.split(self.chunk))

    def loss(self, theta: torch.Tensor | None = None) -> float:
        th = self.theta if theta is None else theta
        with torch.no_grad():
            tot = sum(self._chunk_loss(th, xb, yb) for xb, yb in self._chunks())
        return float(tot) / self.n

    def loss_and_grad(self, theta: torch.Tensor) -> tuple[float, torch.Tensor]:
        g = torch.zeros_like(theta)
        tot = 0.0
        for xb, yb in self._chunks():
            th = theta.detach().requires_grad_(True)
            loss = self._chunk_loss(th, xb, yb)
            (gc,) = torch.autograd.grad(loss, th)
            g += gc
            tot += float(loss.detach())
        return tot / self.n, g / self.n

    def hvp(self, v: torch.Tensor) -> torch.Tensor:
        """H v at the current parameters (forward-over-reverse, summed over data chunks)."""
        self.n_hvp += 1
        out = torch.zeros_like(self.theta)
        v = v.to(self.theta.dtype)
        for xb, yb in self._chunks():
            def g(th: torch.Tensor, xb: torch.Tensor = xb, yb: torch.Tensor = yb) -> torch.Tensor:
                return grad(self._chunk_loss)(th, xb, yb)

            _, hv = jvp(g, (self.theta,), (v,))
            out += hv
        return out / self.n


    def hvp_many(self, V: torch.Tensor) -> torch.Tensor:
        """H v for each row of V [b, n] at once: `vmap` over the tangents shares each chunk's
        primal forward/backward among the b products (used by Hutchinson and SLQ probes).
        The chunk shrinks by b so the tangent activations stay within one chunk's memory."""
        from torch.func import vmap

        self.n_hvp += V.shape[0]
        out = torch.zeros_like(V)
        V = V.to(self.theta.dtype)
        chunk = max(1, self.chunk // V.shape[0])
        for xb, yb in zip(self.x.split(chunk), self.y.split(chunk)):
            def g(th: torch.Tensor, xb: torch.Tensor = xb, yb: torch.Tensor = yb) -> torch.Tensor:
                return grad(self._chunk_loss)(th, xb, yb)

            def one(v: torch.Tensor, g: Callable = g) -> torch.Tensor:
                return jvp(g, (self.theta,), (v,))[1]

            out += vmap(one)(V)
        return out / self.n


def _check_data(data: Data) -> Data:
    try:
        x, y = data
    except (TypeError, ValueError):
        raise ConfigError("data must be an (X, y) pair of tensors") from None
    if not isinstance(x, torch.Tensor) or not isinstance(y, torch.Tensor):
        raise ConfigError("data must be an (X, y) pair of tensors")
    if x.shape[0] == 0:
        raise ConfigError("data is empty: curvature needs at least one sample")
    if x.shape[0] != y.shape[0]:
        raise ConfigError(f"X has {x.shape[0]} samples but y has {y.shape[0]}")
    return x, y


@torch.no_grad()
def check_log_probs(model: nn.Module, data: Data, tol: float = 1e-3) -> None:
    """The curvature is that of the NLL of the model's outputs: they must be log-probabilities
    (each row's logsumexp ~ 0), not logits or probabilities."""
    x, _ = _check_data(data)
    out = model(x[:256])
    if out.ndim != 2:
        raise ConfigError(f"model must return (batch, classes) log-probabilities, got shape "
                          f"{tuple(out.shape)}")
    dev = float(torch.logsumexp(out.double(), dim=1).abs().max())
    if not math.isfinite(dev) or dev > tol:
        raise ConfigError("model outputs are not log-probabilities (logsumexp of a row is "
                          f"{dev:.3g}, not 0): end the model with LogSoftmax")


def _objective(model: nn.Module, data: Data, names: Sequence[str] | None,
               batch_size: int | None) -> Objective:
    check_log_probs(model, data)
    return Objective(model, data, names=names, batch_size=batch_size)


def _in_eval_mode(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Curvature is that of the deterministic function the model computes at evaluation
    (BatchNorm with running statistics, no dropout); the model's mode is restored after."""
    import functools

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


def _rademacher(n: int, gen: torch.Generator, like: torch.Tensor) -> torch.Tensor:
    r = torch.randint(0, 2, (n,), generator=gen).to(like) * 2 - 1
    return r


def _unit(v: torch.Tensor) -> torch.Tensor:
    return v / v.norm().clamp_min(1e-30)


def lanczos(matvec: Callable[[torch.Tensor], torch.Tensor], v0: torch.Tensor, n_steps: int,
            *, k: int = 1, tol: float | None = None,
            ) -> tuple[np.ndarray, np.ndarray, torch.Tensor, list[float], float]:
    """Lanczos with full reorthogonalization, started at v0.

    Returns (alpha, beta, basis Q[m, n], history of the top Ritz value, beta_{m+1}) after m
    steps = m products (beta_{m+1} gives the residuals of the Ritz pairs). With `tol` it stops
    as soon as the top-k Ritz pairs satisfy the error bound min(r, r^2/gap) <= tol |theta|.
    Reorthogonalizing against every previous vector (two Gram-Schmidt passes) keeps the basis
    orthogonal in float32, so no spurious copies of converged eigenvalues appear.
    """
    n = v0.numel()
    m_max = min(n_steps, n)
    Q = torch.zeros(m_max, n, dtype=v0.dtype, device=v0.device)
    alpha: list[float] = []
    beta: list[float] = []
    q = _unit(v0)
    history: list[float] = []
    for j in range(m_max):
        Q[j] = q
        w = matvec(q)
        a = float(w @ q)
        alpha.append(a)
        basis = Q[: j + 1]
        for _ in range(2):
            w = w - basis.T @ (basis @ w)
        b = float(w.norm())
        ritz, vecs = _ritz(alpha, beta)
        history.append(float(ritz[-1]))
        if tol is not None and j + 1 >= k:
            bounds = _error_bounds(ritz, vecs, b, k)
            if all(bd <= tol * max(abs(t), 1e-30) for bd, t in zip(bounds, ritz[::-1][:k])):
                return np.array(alpha), np.array(beta), Q[: j + 1], history, b
        if b < 1e-10 * max(abs(a), 1.0) or j + 1 == m_max:  # invariant subspace or budget
            return np.array(alpha), np.array(beta), Q[: j + 1], history, b
        beta.append(b)
        q = w / b
    return np.array(alpha), np.array(beta), Q, history, 0.0


def _ritz(alpha: Sequence[float], beta: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    from scipy.linalg import eigh_tridiagonal

    a = np.asarray(alpha, dtype=float)
    if len(a) == 1:
        return a.copy(), np.ones((1, 1))
    return eigh_tridiagonal(a, np.asarray(beta[: len(a) - 1], dtype=float))


def _residuals(vecs: np.ndarray, b_next: float, k: int) -> list[float]:
    """||H y_i - theta_i y_i|| = beta_{m+1} |s_{m,i}| for the top-k Ritz pairs (descending)."""
    return [abs(b_next * vecs[-1, -1 - i]) for i in range(min(k, vecs.shape[1]))]


def _error_bounds(ritz: np.ndarray, vecs: np.ndarray, b_next: float, k: int) -> list[float]:
    res = _residuals(vecs, b_next, k)
    out = []
    desc = ritz[::-1]
    for i, r in enumerate(res):
        others = np.delete(desc, i)
        gap = float(np.min(np.abs(others - desc[i]))) if others.size else math.inf
        out.append(min(r, r * r / gap) if 0 < gap < math.inf else r)
    return out


def _power(matvec: Callable[[torch.Tensor], torch.Tensor], starts: list[torch.Tensor], k: int,
           tol: float, max_iter: int) -> tuple[list[float], list[float], list[torch.Tensor], bool, int,
                                   list[float]]:
    """Power iteration with deflation (orthogonalization against the found vectors), as
    PyHessian does, but stopping on the residual ||Hv - lambda v|| <= tol |lambda| rather than
    on the change of the estimate (which can stall early on a slowly converging iterate)."""
    vals: list[float] = []
    res: list[float] = []
    vecs: list[torch.Tensor] = []
    history: list[float] = []
    ok = True
    its = 0
    for i in range(k):
        v = starts[i]
        for u in vecs:
            v = v - (u @ v) * u
        v = _unit(v)
        hv = matvec(v)
        lam, r = float(v @ hv), math.inf
        for _ in range(max_iter):
            its += 1
            for u in vecs:
                hv = hv - (u @ hv) * u
            lam = float(v @ hv)
            r = float((hv - lam * v).norm())
            if i == 0:
                history.append(lam)
            if r <= tol * max(abs(lam), 1e-30):
                break
            v = _unit(hv)
            hv = matvec(v)
        else:
            ok = False
        vals.append(lam)
        res.append(r)
        vecs.append(v)
    return vals, res, vecs, ok, its, history


def _top_eigs(obj: Objective, k: int, method: str, tol: float, max_iter: int, seed: int,
              return_vectors: bool, on_fail: str) -> EigenResult:
    if k < 1:
        raise ConfigError(f"k must be at least 1, got {k}")
    if k > obj.dim:
        raise ConfigError(f"k={k} is larger than the number of parameters ({obj.dim})")
    if tol <= 0 or max_iter < 1:
        raise ConfigError("tol must be > 0 and max_iter >= 1")
    gen = torch.Generator().manual_seed(seed)
    v0 = _rademacher(obj.dim, gen, obj.theta)
    start = obj.n_hvp
    if method == "lanczos":
        steps = max(max_iter, k + 1)
        alpha, beta, Q, hist, b_next = lanczos(obj.hvp, v0, steps, k=k, tol=tol)
        ritz, s = _ritz(alpha, beta)
        m = len(alpha)
        order = np.argsort(ritz)[::-1][:k]
        vals = [float(ritz[i]) for i in order]
        res = [float(abs(b_next * s[-1, i])) for i in order]
        bounds = [float(b) for b in _error_bounds(ritz, s, b_next, k)]
        converged = all(bd <= tol * max(abs(v), 1e-30) for bd, v in zip(bounds, vals)) or (
            m == obj.dim)
        vecs = ([(Q.T @ torch.as_tensor(s[:, i], dtype=Q.dtype)) for i in order]
                if return_vectors else None)
        result = EigenResult(vals, res, converged, obj.n_hvp - start, m, method, vecs, bounds,
                             hist)
    elif method == "power":
        starts = [v0] + [_rademacher(obj.dim, gen, obj.theta) for _ in range(k - 1)]
        vals, res, vecs, ok, its, hist = _power(obj.hvp, starts, k, tol, max_iter)
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


@_in_eval_mode
def hessian_eigenvalues(model: nn.Module, data: Data, k: int = 1, *, method: str = "lanczos",
                        tol: float = 1e-3, max_iter: int = 100, batch_size: int | None = None,
                        per_layer: bool = False, return_vectors: bool = False, seed: int = 0,
                        on_fail: str = "warn") -> EigenResult | dict[str, EigenResult]:
    """Top-k (largest algebraic) Hessian eigenvalues of the mean NLL over `data`.

    method: "lanczos" (default; full reorthogonalization, stops when the error bound is below
    `tol` relative) or "power" (with deflation; stops when the residual is below `tol` relative;
    converges to the largest-magnitude eigenvalue). `max_iter` bounds the iterations (= Hessian-
    vector products, plus one for the final residual). `batch_size` = samples per chunk of the
    product. `per_layer=True` returns {layer name: result} for each diagonal block (the Hessian
    of the loss in that layer's parameters with the others fixed). `on_fail`: "warn" (default),
    "raise" (ConvergenceError) or "ignore"; the result always carries `converged` and residuals.
    """
    if on_fail not in ("warn", "raise", "ignore"):
        raise ConfigError("on_fail must be warn, raise or ignore")
    check_log_probs(model, data)
    if per_layer:
        out = {}
        for name, names in parameter_blocks(model).items():
            obj = Objective(model, data, names=names, batch_size=batch_size)
            out[name] = _top_eigs(obj, k, method, tol, max_iter, seed, return_vectors, on_fail)
        return out
    obj = Objective(model, data, batch_size=batch_size)
    return _top_eigs(obj, k, method, tol, max_iter, seed, return_vectors, on_fail)


# ----------------------------------------------------------------------------- trace
@dataclass
class TraceResult:
    estimate: float
    stderr: float
    n_samples: int
    samples: list[float]


@_in_eval_mode
def hessian_trace(model: nn.Module, data: Data, *, n_samples: int = 100, seed: int = 0,
                  batch_size: int | None = None, probes_per_pass: int = 8) -> TraceResult:
    """Hutchinson's estimator tr(H) = E[z^T H z], z Rademacher; returns the mean over
    `n_samples` probes and its standard error (sd / sqrt(n)). `probes_per_pass` probes share
    one pass over the data (vmapped tangents)."""
    if n_samples < 2:
        raise ConfigError("n_samples must be at least 2 (the standard error needs two)")
    obj = _objective(model, data, None, batch_size)
    gen = torch.Generator().manual_seed(seed)
    vals: list[float] = []
    while len(vals) < n_samples:
        b = min(max(1, probes_per_pass), n_samples - len(vals))
        Z = torch.stack([_rademacher(obj.dim, gen, obj.theta) for _ in range(b)])
        vals.extend((Z * obj.hvp_many(Z)).sum(1).tolist())
    a = np.asarray(vals)
    return TraceResult(float(a.mean()), float(a.std(ddof=1) / math.sqrt(len(a))), len(a), vals)


# ----------------------------------------------------------------------------- density
@dataclass
class SpectralDensity:
    grid: np.ndarray
    density: np.ndarray
    nodes: np.ndarray  # Ritz values, one row per probe vector
    weights: np.ndarray  # quadrature weights (each row sums to 1)
    sigma: float


@_in_eval_mode
def spectral_density(model: nn.Module, data: Data, *, n_vectors: int = 1, n_steps: int = 80,
                     n_grid: int = 1000, sigma: float | None = None, seed: int = 0,
                     batch_size: int | None = None) -> SpectralDensity:
    """Eigenvalue density by stochastic Lanczos quadrature (Ghorbani et al., PyHessian): for
    each Rademacher probe, `n_steps` Lanczos steps give nodes (Ritz values) and weights (squared
    first components of the Ritz vectors); the density is their Gaussian-smoothed average.
    `sigma` defaults to 1% of the spectral range. The density integrates to 1 over the grid,
    which spans the nodes +- 5 sigma."""
    if n_vectors < 1 or n_steps < 1:
        raise ConfigError("n_vectors and n_steps must be at least 1")
    obj = _objective(model, data, None, batch_size)
    gen = torch.Generator().manual_seed(seed)
    nodes, weights = [], []
    for _ in range(n_vectors):
        v0 = _rademacher(obj.dim, gen, obj.theta)
        alpha, beta, _, _, _ = lanczos(obj.hvp, v0, n_steps)
        ritz, s = _ritz(alpha, beta)
        nodes.append(ritz)
        weights.append(s[0, :] ** 2)
    m = max(len(r) for r in nodes)
    N = np.full((n_vectors, m), np.nan)
    W = np.zeros((n_vectors, m))
    for i, (r, w) in enumerate(zip(nodes, weights)):
        N[i, : len(r)], W[i, : len(w)] = r, w
    lo, hi = float(np.nanmin(N)), float(np.nanmax(N))
    sig = sigma if sigma is not None else max(0.01 * (hi - lo), 1e-12)
    grid = np.linspace(lo - 5 * sig, hi + 5 * sig, n_grid)
    dens = np.zeros_like(grid)
    for r, w in zip(nodes, weights):
        dens += (w[None, :] * np.exp(-((grid[:, None] - r[None, :]) ** 2) / (2 * sig**2))).sum(1)
    dens /= n_vectors * sig * math.sqrt(2 * math.pi)
    return SpectralDensity(grid, dens, N, W, sig)


# ----------------------------------------------------------------------------- sharpness
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


@_in_eval_mode
def sharpness(model: nn.Module, data: Data, *, epsilon: float = 1e-3,
              subspace_dim: int | None = None, max_iter: int = 10, seed: int = 0,
              batch_size: int | None = None) -> SharpnessResult:
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
    obj = _objective(model, data, None, batch_size)
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


# ----------------------------------------------------------------------------- interpolation
@torch.no_grad()
def interpolate(model_a: nn.Module, model_b: nn.Module, data_train: Data, data_test: Data,
                alphas: Sequence[float] | None = None, batch_size: int | None = None
                ) -> list[dict[str, float]]:
    """Keskar's 1-D parametric plot: train/test loss and accuracy of (1 - a) x_a + a x_b for
    each a in `alphas` (default 25 points on [-1, 2]). Buffers (e.g. BatchNorm statistics) are
    interpolated too."""
    check_log_probs(model_a, data_train)
    check_log_probs(model_b, data_train)
    _check_data(data_test)
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
                    loss += float(F.nll_loss(out, yb, reduction="sum"))
                    correct += float((out.argmax(1) == yb).sum())
                row[f"{split}_loss"] = loss / len(y)
                row[f"{split}_acc"] = correct / len(y)
            rows.append(row)
    finally:
        model_a.train(was)
    return rows
