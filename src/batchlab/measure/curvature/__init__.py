"""Curvature of the loss surface: Hessian eigenvalues, trace, spectral density, Keskar sharpness
and 1-D interpolation, for any `nn.Module` and loss.

Modules, one job each:
- `objective`: the mean loss over the data as a function of a flat parameter vector and its
  exact Hessian-vector products: the gradient graph built once and reused when the data fit in
  memory, rebuilt per chunk when they do not (a measured memory rule), probes batched;
- `krylov`: Lanczos (single and lock-step) and power iteration on any symmetric product;
- `hessian`: the queries (`hessian_eigenvalues`, `hessian_trace`, `spectral_density`);
- `landscape`: `sharpness` and `interpolate` (losses and gradients only);
- `compat`: `Hessian`, PyHessian's interface on the above.

Data are an `(X, y)` pair of tensors or a DataLoader of pairs (the same samples every pass);
`criterion(outputs, targets)` is a mean loss, by default NLL of log-probabilities (use
`nn.CrossEntropyLoss()` for a logits model).

Correspondence with PyHessian (`from pyhessian import hessian`):

    PyHessian                                batchlab
    hessian(model, criterion, data=(X, y))   Hessian(model, criterion, data=(X, y)), or the
                                             functions below with (X, y), criterion=criterion
    hessian(..., dataloader=loader)          Hessian(..., dataloader=loader); functions take
                                             the loader in place of (X, y)
    hessian(..., cuda=True)                  cuda=True (Hessian) or model and data on the GPU
    .eigenvalues(maxIter, tol, top_n)        hessian_eigenvalues(model, data, k=top_n,
                                             max_iter=maxIter, tol=tol); tol there bounds the
                                             error (a-posteriori), Hessian.eigenvalues keeps
                                             PyHessian's "relative change < tol" rule
    .trace(maxIter, tol)                     hessian_trace(model, data, n_samples=maxIter,
                                             tol=tol); tol=None (default) uses all probes
    .density(iter, n_v)                      spectral_density(model, data, n_steps=iter,
                                             n_vectors=n_v); nodes/weights as PyHessian's lists

Both compute the same Hessian; products agree to float32 rounding.
"""

from __future__ import annotations

from batchlab.measure.curvature.compat import Hessian
from batchlab.measure.curvature.hessian import (
    ConvergenceError,
    EigenResult,
    SpectralDensity,
    deflated_slq,
    hessian_eigenvalues,
    hessian_trace,
    slq_nodes,
    smooth_density,
    spectral_density,
    top_eigenvalues,
    wasserstein1,
)
from batchlab.measure.curvature.krylov import lanczos, lanczos_many, power_iteration
from batchlab.measure.curvature.landscape import SharpnessResult, interpolate, sharpness
from batchlab.measure.curvature.objective import (
    DEFAULT_CHUNK,
    DEFAULT_MEMORY,
    Objective,
    check_log_probs,
    nll_criterion,
)
from batchlab.measure.curvature.trace import TraceResult, hutchinson, hutchinson_adaptive, hutchpp
from batchlab.measure.layers import parameter_blocks

__all__ = [
    "DEFAULT_CHUNK", "DEFAULT_MEMORY", "ConvergenceError", "EigenResult", "Hessian", "Objective",
    "SharpnessResult", "SpectralDensity", "TraceResult", "check_log_probs", "deflated_slq",
    "hessian_eigenvalues",
    "hessian_trace", "hutchinson", "hutchinson_adaptive", "hutchpp", "interpolate", "lanczos",
    "lanczos_many", "nll_criterion",
    "parameter_blocks", "power_iteration", "sharpness", "slq_nodes", "smooth_density",
    "spectral_density", "top_eigenvalues", "wasserstein1",
]
