"""PyHessian's interface on batchlab's operators, for users moving code over:

    PyHessian                                      batchlab
    from pyhessian import hessian                  from batchlab.measure.curvature import Hessian
    h = hessian(model, criterion, data=(X, y),     h = Hessian(model, criterion, data=(X, y),
                cuda=False)                                    cuda=False)
    h.eigenvalues(maxIter=100, tol=1e-3, top_n=5)  h.eigenvalues(maxIter=100, tol=1e-3, top_n=5)
    h.trace(maxIter=100, tol=1e-3)                 h.trace(maxIter=100, tol=1e-3)
    h.density(iter=100, n_v=1)                     h.density(iter=100, n_v=1)

Same arguments, same return types and the same meaning of `tol`: eigenvalues stop when each
of the top_n estimates changed by less than tol (relative) between two products, the trace
when the running mean did. What differs is how: the top_n eigenvalues come from one Lanczos
run (all of them from the same Krylov space) instead of top_n deflated power iterations, the
trace probes and the density's n_v Lanczos runs share batched products, and a `dataloader`
whose data fit the memory budget is gathered once and its gradient graph kept. Random vectors
come from `seed` (PyHessian draws from torch's global generator).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from batchlab.errors import ConfigError
from batchlab.measure.curvature.hessian import slq_nodes, top_eigenvalues
from batchlab.measure.curvature.objective import DEFAULT_MEMORY, Criterion, Data, Objective
from batchlab.measure.curvature.trace import hutchinson


class Hessian:
    """`pyhessian.hessian` with batchlab's solvers. The model is put in eval mode (as PyHessian
    does). `cuda=True` moves the data to the GPU (the model must already be there)."""

    def __init__(self, model: nn.Module, criterion: Criterion, data: Data | None = None,
                 dataloader: Iterable[Data] | None = None, cuda: bool = False, *,
                 seed: int = 0, probes_per_pass: int | None = None,
                 memory_budget: int = DEFAULT_MEMORY) -> None:
        if (data is None) == (dataloader is None):
            raise ConfigError("pass exactly one of data=(X, y) and dataloader=")
        if cuda and not torch.cuda.is_available():
            raise ConfigError("cuda=True but no CUDA device is available")
        source: Data | Iterable[Data]
        if data is not None:
            source = tuple(t.cuda() for t in data) if cuda else data  # type: ignore[assignment]
        else:
            assert dataloader is not None
            source = ([tuple(t.cuda() for t in b) for b in dataloader] if cuda
                      else dataloader)  # type: ignore[misc]
        self.model = model.eval()
        self.obj = Objective(model, source, criterion=criterion, memory_budget=memory_budget,
                             probes_per_pass=probes_per_pass)
        self.seed = seed

    def _as_params(self, v: torch.Tensor) -> list[torch.Tensor]:
        return [p.view(s) for p, s in zip(v.split(self.obj.numels), self.obj.shapes)]

    def eigenvalues(self, maxIter: int = 100, tol: float = 1e-3, top_n: int = 1,
                    ) -> tuple[list[float], list[list[torch.Tensor]]]:
        """The top_n eigenvalues (descending) and their eigenvectors (as lists of
        parameter-shaped tensors). maxIter bounds the products (PyHessian: per eigenvalue)."""
        res = top_eigenvalues(self.obj, top_n, "lanczos", tol, max(maxIter, top_n + 1),
                              self.seed, return_vectors=True, on_fail="ignore", rule="change")
        return res.eigenvalues, [self._as_params(v) for v in res.eigenvectors or []]

    def trace(self, maxIter: int = 100, tol: float = 1e-3) -> list[float]:
        """The Hutchinson samples v^T H v; their mean is the trace estimate."""
        return hutchinson(self.obj, maxIter, self.seed, tol)

    def density(self, iter: int = 100, n_v: int = 1,
                ) -> tuple[list[list[float]], list[list[float]]]:
        """(eigen_list_full, weight_list_full): per SLQ run, its Ritz values and weights."""
        runs = slq_nodes(self.obj, n_v, iter, self.seed)
        return [list(map(float, r)) for r, _ in runs], [list(map(float, w)) for _, w in runs]
