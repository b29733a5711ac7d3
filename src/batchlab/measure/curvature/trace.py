"""Trace estimators on an `Objective`'s Hessian-vector products: Hutchinson (fixed count or
PyHessian's `tol` rule), Hutchinson with variance-based stopping, and adaptive Hutch++.

Kept apart from `hessian` (the model-facing entry points) because these are pure estimators:
they see only `obj.dim`, `obj.theta` and `obj.hvp_many`, so they can be tested and compared on
any symmetric operator, and read in one sitting.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from batchlab.errors import ConfigError
from batchlab.measure.curvature.krylov import rademacher
from batchlab.measure.curvature.objective import Objective

MIN_BLOCKS = 2  # residual probe blocks drawn before the stopping rule is first checked


@dataclass
class TraceResult:
    """`samples` are the residual probes' z^T H z (Hutch++: after deflating the sketch, whose
    exact part is `sketch_trace`); `n_hvp` counts every Hessian-vector product spent."""

    estimate: float
    stderr: float
    n_samples: int
    samples: list[float]
    n_hvp: int = 0
    method: str = "hutchinson"
    converged: bool = True
    sketch_rank: int = 0
    sketch_trace: float = 0.0


def normal_quantile(confidence: float) -> float:
    """Two-sided normal quantile z with P(|N(0,1)| <= z) = confidence."""
    from statistics import NormalDist

    return NormalDist().inv_cdf(0.5 + confidence / 2)


def t_quantile(confidence: float, df: int) -> float:
    """Two-sided Student-t quantile with `df` degrees of freedom."""
    from scipy.stats import t

    return float(t.ppf(0.5 + confidence / 2, df))


def check_adaptive(rtol: float, max_hvp: int, confidence: float, block: int) -> None:
    if not (rtol > 0 and math.isfinite(rtol)):
        raise ConfigError(f"rtol must be a positive number, got {rtol}")
    if not 0 < confidence < 1:
        raise ConfigError(f"confidence must be in (0, 1), got {confidence}")
    if block < 2 or max_hvp < 2 * block:
        raise ConfigError(f"max_hvp ({max_hvp}) must be at least twice block ({block}), "
                          "block at least 2")


def _probe_rounds(obj: Objective, gen: torch.Generator, confidence: float, rtol: float,
                  budget: int, block: int, base: float,
                  project: Callable[[torch.Tensor], torch.Tensor],
                  vals: list[float]) -> tuple[list[float], bool]:
    """Draws (projected) Rademacher probes `block` at a time until the `confidence` interval
    t_{n-1} se is within rtol of |base + mean| or `budget` products are spent; the rule is
    checked only after whole blocks, so the draws do not depend on how products are batched.

    Why conservative: stopping the first time an estimated se is small picks, among the
    checks, the one whose sample variance came out low by chance, so the nominal normal
    interval under-covered (18/20 and 39/40 runs within 1% at 95%, benchmarks/curvature.py).
    The t quantile widens the interval where the variance rests on few probes, and the rule
    is not checked before MIN_BLOCKS blocks (a variance from 8 values is too rough to trust)."""
    while True:
        n = len(vals)
        if n >= max(2, MIN_BLOCKS * block):
            a = np.asarray(vals)
            se = float(a.std(ddof=1) / math.sqrt(n))
            if t_quantile(confidence, n - 1) * se <= rtol * abs(base + float(a.mean())):
                return vals, True
        b = min(block, budget)
        if b <= 0:
            return vals, False
        G = project(torch.stack([rademacher(obj.dim, gen, obj.theta) for _ in range(b)]))
        vals.extend((G * obj.hvp_many(G)).sum(1).tolist())
        budget -= b


def hutchinson_adaptive(obj: Objective, rtol: float, max_hvp: int, seed: int = 0,
                        confidence: float = 0.95, block: int = 8) -> TraceResult:
    """Hutchinson with variance-based stopping: Rademacher probes in blocks until
    t_{n-1} * sd / sqrt(n) <= rtol * |mean| (at least MIN_BLOCKS blocks) or max_hvp products."""
    check_adaptive(rtol, max_hvp, confidence, block)
    gen = torch.Generator().manual_seed(seed)
    start = obj.n_hvp
    vals, ok = _probe_rounds(obj, gen, confidence, rtol, max_hvp, block, 0.0, lambda G: G, [])
    a = np.asarray(vals)
    return TraceResult(float(a.mean()), float(a.std(ddof=1) / math.sqrt(len(a))), len(a), vals,
                       obj.n_hvp - start, "hutchinson", ok)


def hutchpp(obj: Objective, rtol: float, max_hvp: int, seed: int = 0,
            confidence: float = 0.95, block: int = 8) -> TraceResult:
    """Adaptive Hutch++ (Meyer, Musco, Musco & Woodruff 2021) with variance-based stopping.

    Why fewer products: Hutchinson's variance is 2 ||H||_F^2 minus the diagonal's share, and a
    network's Hessian concentrates its Frobenius mass in a few outlying eigenvalues. Hutch++
    takes their trace exactly, tr(Q^T H Q) for an orthonormal Q spanning H S (S Rademacher),
    and runs Hutchinson only on the deflated rest (I - QQ^T) H (I - QQ^T), whose variance is
    that of the tail. It is unbiased for any Q drawn independently of the residual probes, and
    the stated standard error is that of the residual mean (the exact part has none given Q).

    The sketch grows `block` columns at a time (2 block products: H S, then H Q); after each
    growth `block` residual probes estimate the variance, hence the products still needed,
    z^2 var / (rtol tr)^2. Growth stops when the last block saved fewer products than it cost;
    the residual probes of the final sketch are kept and more are drawn until
    t_{n-1} * se <= rtol * |estimate| (at least MIN_BLOCKS blocks of them, `_probe_rounds`) or
    `max_hvp` products are spent (then `converged` is False).
    """
    check_adaptive(rtol, max_hvp, confidence, block)
    z = normal_quantile(confidence)
    gen = torch.Generator().manual_seed(seed)
    start = obj.n_hvp
    Q = obj.theta.new_zeros((0, obj.dim))
    t_sketch = 0.0
    prev_need = math.inf
    vals: list[float] = []

    def project(G: torch.Tensor) -> torch.Tensor:
        for _ in range(2):  # twice is enough (Kahan) in floating point
            G = G - (G @ Q.T) @ Q
        return G

    while True:
        left = max_hvp - (obj.n_hvp - start)
        if Q.shape[0] + block > obj.dim or left < 3 * block:
            break
        S = torch.stack([rademacher(obj.dim, gen, obj.theta) for _ in range(block)])
        Y = project(obj.hvp_many(S))
        q, r = torch.linalg.qr(Y.T)
        keep = r.diagonal().abs() > 1e-10 * max(float(r.diagonal().abs().max()), 1e-300)
        new = project(q.T[keep])
        new = torch.linalg.qr(new.T)[0].T if new.shape[0] else new
        if new.shape[0]:
            t_sketch += float((new * obj.hvp_many(new)).sum())
            Q = torch.cat([Q, new])
        cost_before = obj.n_hvp - start
        vals, ok = _probe_rounds(obj, gen, confidence, math.inf, block, block, t_sketch,
                                 project, [])
        a = np.asarray(vals)
        var = float(a.var(ddof=1))
        total = abs(t_sketch + float(a.mean()))
        need = z * z * var / max(rtol * total, 1e-300) ** 2 if var > 0 else 0.0
        spent = obj.n_hvp - start - cost_before + 2 * block
        if need <= block or prev_need - need < spent:
            break
        prev_need = need
    left = max_hvp - (obj.n_hvp - start)
    vals, ok = _probe_rounds(obj, gen, confidence, rtol, left, block, t_sketch, project, vals)
    if not vals:
        raise ConfigError(f"max_hvp={max_hvp} leaves no product for the residual probes")
    a = np.asarray(vals)
    se = float(a.std(ddof=1) / math.sqrt(len(a))) if len(a) > 1 else math.nan
    return TraceResult(t_sketch + float(a.mean()), se, len(a), vals, obj.n_hvp - start,
                       "hutch++", ok, int(Q.shape[0]), t_sketch)


def hutchinson(obj: Objective, n_samples: int, seed: int = 0, tol: float | None = None,
               draw: int = 16) -> list[float]:
    """z^T H z for up to `n_samples` Rademacher probes, drawn `draw` at a time and multiplied
    by `obj.hvp_many` (which batches them as its `probes_per_pass` says). With `tol`
    (PyHessian's meaning) it stops at the first probe where the running mean changed by less
    than tol (|previous mean| + 1e-6); the probes are the same either way."""
    gen = torch.Generator().manual_seed(seed)
    vals: list[float] = []
    mean = 0.0
    while len(vals) < n_samples:
        b = min(max(1, draw), n_samples - len(vals))
        Z = torch.stack([rademacher(obj.dim, gen, obj.theta) for _ in range(b)])
        for q in (Z * obj.hvp_many(Z)).sum(1).tolist():
            vals.append(q)
            new = float(np.mean(vals))
            if tol is not None and abs(new - mean) / (abs(mean) + 1e-6) < tol:
                return vals
            mean = new
    return vals
