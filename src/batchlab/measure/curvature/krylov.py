"""Krylov solvers on a symmetric operator given only by its products: Lanczos with full
reorthogonalization (one run, or several in lock step sharing each batched product) and power
iteration with deflation. Pure linear algebra: nothing here knows about models or data.

Why Lanczos: power iteration's error shrinks like (lambda_2 / lambda_1)^(2t). Lanczos builds the
Krylov space of the same products and extracts its best (Rayleigh-Ritz) estimates, which
converge like a Chebyshev polynomial in the gap, for all the top-k values at once: far fewer
products for the same accuracy. Stopping rules (`rule`):
- "bound" (default): the a-posteriori bound. The residual ||H y - theta y|| = beta_{m+1} |s_m|
  is exact and cheap, and the eigenvalue error is at most min(r, r^2 / gap) with the gap
  estimated from the Ritz values; stop when it is <= tol |theta| for each of the top k.
- "change" (PyHessian's `tol`): stop when each of the top-k estimates changed by less than
  tol (|theta| + 1e-6) since the previous product.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
import torch

MatVec = Callable[[torch.Tensor], torch.Tensor]


def rademacher(n: int, gen: torch.Generator, like: torch.Tensor) -> torch.Tensor:
    """A +-1 vector drawn from `gen` (on the CPU, so the draw is device-independent)."""
    return torch.randint(0, 2, (n,), generator=gen).to(like) * 2 - 1


def unit(v: torch.Tensor) -> torch.Tensor:
    return v / v.norm().clamp_min(1e-30)


def ritz(alpha: Sequence[float], beta: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """Eigenvalues (ascending) and eigenvectors of the Lanczos tridiagonal matrix."""
    from scipy.linalg import eigh_tridiagonal

    a = np.asarray(alpha, dtype=float)
    if len(a) == 1:
        return a.copy(), np.ones((1, 1))
    return eigh_tridiagonal(a, np.asarray(beta[: len(a) - 1], dtype=float))


def residuals(vecs: np.ndarray, b_next: float, k: int) -> list[float]:
    """||H y_i - theta_i y_i|| = beta_{m+1} |s_{m,i}| for the top-k Ritz pairs (descending)."""
    return [abs(b_next * vecs[-1, -1 - i]) for i in range(min(k, vecs.shape[1]))]


def error_bounds(values: np.ndarray, vecs: np.ndarray, b_next: float, k: int) -> list[float]:
    """min(r, r^2 / gap) for the top-k Ritz values (descending)."""
    out = []
    desc = values[::-1]
    for i, r in enumerate(residuals(vecs, b_next, k)):
        others = np.delete(desc, i)
        gap = float(np.min(np.abs(others - desc[i]))) if others.size else math.inf
        out.append(min(r, r * r / gap) if 0 < gap < math.inf else r)
    return out


def _done(rule: str, tol: float, k: int, values: np.ndarray, vecs: np.ndarray, b: float,
          prev: np.ndarray | None) -> bool:
    top = values[::-1][:k]
    if rule == "bound":
        bounds = error_bounds(values, vecs, b, k)
        return all(bd <= tol * max(abs(t), 1e-30) for bd, t in zip(bounds, top))
    if prev is None or len(prev) < k:
        return False
    return all(abs(t - p) < tol * (abs(p) + 1e-6) for t, p in zip(top, prev[::-1][:k]))


def lanczos(matvec: MatVec, v0: torch.Tensor, n_steps: int, *, k: int = 1,
            tol: float | None = None, rule: str = "bound",
            ) -> tuple[np.ndarray, np.ndarray, torch.Tensor, list[float], float]:
    """Lanczos with full reorthogonalization, started at v0.

    Returns (alpha, beta, basis Q[m, n], history of the top Ritz value, beta_{m+1}) after m
    steps = m products (beta_{m+1} gives the residuals of the Ritz pairs). With `tol` it stops
    as soon as the top-k Ritz values pass `rule` (module docstring). Reorthogonalizing against
    every previous vector (two Gram-Schmidt passes, as two matrix products) keeps the basis
    orthogonal in float32, so no spurious copies of converged eigenvalues appear.
    """
    n = v0.numel()
    m_max = min(n_steps, n)
    Q = torch.zeros(m_max, n, dtype=v0.dtype, device=v0.device)
    alpha: list[float] = []
    beta: list[float] = []
    q = unit(v0)
    history: list[float] = []
    prev: np.ndarray | None = None
    for j in range(m_max):
        Q[j] = q
        w = matvec(q)
        a = float(w @ q)
        alpha.append(a)
        basis = Q[: j + 1]
        for _ in range(2):
            w = w - basis.T @ (basis @ w)
        b = float(w.norm())
        values, vecs = ritz(alpha, beta)
        history.append(float(values[-1]))
        if tol is not None and j + 1 >= k and _done(rule, tol, k, values, vecs, b, prev):
            return np.array(alpha), np.array(beta), Q[: j + 1], history, b
        prev = values
        if b < 1e-10 * max(abs(a), 1.0) or j + 1 == m_max:  # invariant subspace or budget
            return np.array(alpha), np.array(beta), Q[: j + 1], history, b
        beta.append(b)
        q = w / b
    return np.array(alpha), np.array(beta), Q, history, 0.0


def lanczos_many(matmat: MatVec, V0: torch.Tensor, n_steps: int,
                 ) -> list[tuple[np.ndarray, np.ndarray]]:
    """Independent Lanczos runs (full reorthogonalization), one per row of V0 [r, n], in lock
    step: step j multiplies all still-running vectors in one `matmat` call. Each run gives the
    same (alpha, beta) as `lanczos` from its start vector, up to rounding; a run that reaches
    an invariant subspace stops while the others go on. Memory: r bases of n_steps vectors."""
    r, n = V0.shape
    m_max = min(n_steps, n)
    Q = torch.zeros(r, m_max, n, dtype=V0.dtype, device=V0.device)
    alphas: list[list[float]] = [[] for _ in range(r)]
    betas: list[list[float]] = [[] for _ in range(r)]
    q = V0 / V0.norm(dim=1, keepdim=True).clamp_min(1e-30)
    active = list(range(r))
    for j in range(m_max):
        Q[active, j] = q
        W = matmat(q)
        nxt, still = [], []
        for row, i in enumerate(active):
            w = W[row]
            a = float(w @ q[row])
            alphas[i].append(a)
            basis = Q[i, : j + 1]
            for _ in range(2):
                w = w - basis.T @ (basis @ w)
            b = float(w.norm())
            if b < 1e-10 * max(abs(a), 1.0) or j + 1 == m_max:
                continue
            betas[i].append(b)
            nxt.append(w / b)
            still.append(i)
        if not still:
            break
        active, q = still, torch.stack(nxt)
    return [(np.array(a), np.array(b)) for a, b in zip(alphas, betas)]


def power_iteration(matvec: MatVec, starts: list[torch.Tensor], k: int, tol: float,
                    max_iter: int) -> tuple[list[float], list[float], list[torch.Tensor], bool,
                                            int, list[float]]:
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
        v = unit(v)
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
            v = unit(hv)
            hv = matvec(v)
        else:
            ok = False
        vals.append(lam)
        res.append(r)
        vecs.append(v)
    return vals, res, vecs, ok, its, history
