"""Sharpness's curvature measurements as stored units that run as tasks.

The persistence rule: every measurement is a row of the results store keyed by the sha256 of
the weights and of the data it ran on, the device and its settings, so an interrupted run
resumes at the next missing measurement and nothing is wrongly reused. The missing ones run
together through `Measurements.cached_many`: on worker threads here (`--executor local`, one
intra-op thread each, as many as the cores) or as Ray tasks (`--executor ray`), each row stored
by this process as soon as its task is back. Tasks compute with one thread in both pools, so
the executors give the same numbers.

Each function below is one task's body: a deterministic function of its arguments.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from batchlab.errors import ConfigError
from batchlab.experiments.base import Context
from batchlab.measure import curvature as C
from batchlab.runs.measurements import Big, Measurements, Unit, tensors_sha256, weights_sha256

FORMAT = 2  # bump when a stored measurement changes meaning: old rows are then not reused
# 2: trace by Hutch++ stopped at a stated accuracy (was 50 / 8 Hutchinson probes), with the
#    products it spent; spectral density by Krylov-deflated SLQ at the same products

TRACE_MAX_HVP = 600
"""The trace's budget of products: Hutch++ to 7% took 32-64 products on the measured models
(benchmarks/curvature_samples.py); a run that needs more stops here, recorded as not
converged with its standard error."""
TRACE_TYPICAL_HVPS = 64
"""What `--plan` counts per trace at trace_rtol 0.07: the most Hutch++ spent over the measured
models (784-256-256-10, small and large batch, 1,000 to 10,000 mnist-24k examples:
benchmarks/curvature_samples.py)."""
TRACE_TYPICAL_RTOL = 0.07
Data = tuple[torch.Tensor, ...]


def eps_sharpness(model: nn.Module, data: Data, epsilon: float, subspace_dim: int | None,
                  seed: int) -> dict[str, Any]:
    kw = {} if subspace_dim is None else {"subspace_dim": subspace_dim, "seed": seed}
    return {"value": C.sharpness(model, data, epsilon=epsilon, **kw).sharpness}


def top_eigenvalue(model: nn.Module, data: Data, seed: int) -> dict[str, Any]:
    eig = C.hessian_eigenvalues(model, data, k=1, tol=1e-3, max_iter=100, seed=seed)
    return {"lambda_max": eig.top, "lambda_converged": eig.converged,
            "lambda_residual": eig.residuals[0], "lambda_hvps": eig.n_hvp}


def trace(model: nn.Module, data: Data, rtol: float, seed: int) -> dict[str, Any]:
    """Hutch++ until the 95% t interval is within rtol of the estimate: the accuracy is stated,
    and the products it took are recorded (a fixed probe count fixed the products instead,
    leaving the accuracy to the model's spectrum)."""
    tr = C.hessian_trace(model, data, method="hutch++", rtol=rtol, seed=seed,
                         max_hvp=TRACE_MAX_HVP)
    return {"trace": tr.estimate, "trace_se": tr.stderr, "trace_hvps": tr.n_hvp,
            "trace_converged": tr.converged, "trace_sketch_rank": tr.sketch_rank}


def density_split(n_steps: int) -> tuple[int, int]:
    """(Krylov block, probe steps) for `n_steps` products: two thirds deflated, one third of
    SLQ on the complement (the cheapest split within 10% of mean |lambda| in Wasserstein-1 in
    all runs, benchmarks/curvature.py --density-accuracy: 40 + 20 of 60)."""
    k = (2 * n_steps) // 3
    return k, max(1, n_steps - k)


def density(model: nn.Module, data: Data, n_steps: int, seed: int) -> dict[str, Any]:
    k, steps = density_split(n_steps)
    d = C.spectral_density(model, data, n_vectors=1, n_steps=steps, deflate=k, seed=seed)
    rows = [(r[~np.isnan(r)], w[: int((~np.isnan(r)).sum())]) for r, w in zip(d.nodes, d.weights)]
    return {"grid": d.grid.tolist(), "density": d.density.tolist(),
            "nodes": [r.tolist() for r, _ in rows], "weights": [w.tolist() for _, w in rows],
            "mass": [] if d.mass is None else d.mass.tolist(), "sigma": d.sigma,
            "deflated": d.deflated, "w1_bound": d.w1_bound}


def interpolation(small: nn.Module, large: nn.Module, data: Data,
                  alphas: list[float]) -> dict[str, Any]:
    """Keskar's 1-D interpolation; data = (x_train, y_train, x_test, y_test)."""
    return {"rows": C.interpolate(small, large, data[:2], data[2:], alphas)}


class Batch:
    """The measurements of one experiment: added one by one, then run together (`run`)."""

    def __init__(self) -> None:
        self.units: list[Unit] = []
        self.big: dict[str, Any] = {}
        self._sha: dict[int, str] = {}

    def _weights(self, model: nn.Module) -> str:
        if id(model) not in self._sha:
            self._sha[id(model)] = weights_sha256(model)
        return self._sha[id(model)]

    def add(self, what: str, models: Sequence[nn.Module], data: Sequence[torch.Tensor],
            settings: dict[str, Any], fn: Callable[..., dict[str, Any]], *params: Any) -> int:
        """Add fn(*models, data, *params) as the row `sharpness/what`; returns its index."""
        wsh = [self._weights(m) for m in models]
        dsh = tensors_sha256(*data)
        spec = {"format": FORMAT, "weights": wsh, "data": dsh,
                "device": str(data[0].device.type), **settings}
        for m, h in zip(models, wsh):
            self.big.setdefault(f"model:{h}", m)
        self.big.setdefault(f"data:{dsh}", tuple(data))
        args = (*[Big(f"model:{h}") for h in wsh], Big(f"data:{dsh}"), *params)
        self.units.append(Unit(f"sharpness/{what}", spec, fn, args))
        return len(self.units) - 1

    def run(self, ctx: Context) -> list[dict[str, Any]]:
        """Every unit's payload (stored ones read back, the rest computed as tasks)."""
        from batchlab.analysis.gradcomp import default_workers

        if ctx.store is None:
            raise ConfigError("sharpness needs a results store")
        if not self.units:
            return []
        dev = next((p.device for m in self.big.values() if isinstance(m, nn.Module)
                    for p in m.parameters()), torch.device("cpu"))
        done = [0]

        def advance(_: int) -> None:
            done[0] += 1
            if ctx.progress is not None:
                ctx.progress("sharpness: curvature", done[0], len(self.units))

        meas = Measurements(ctx.store, warn=ctx.log)
        return meas.cached_many(self.units, self.big, executor=ctx.executor,
                                ray_address=ctx.ray_address, workers=default_workers(dev),
                                cpu=dev.type == "cpu", on_done=advance)


def curvature_units(batch: Batch, model: nn.Module, data: Data, seed: int, p_sub: int,
                    trace_rtol: float, epsilons: Sequence[float]) -> dict[str, int]:
    """One final model's curvature measurements: row name -> unit index in `batch`."""
    out = {}
    for eps in epsilons:
        for dim in (None, p_sub):
            name = "full" if dim is None else f"sub{p_sub}"
            sd = None if dim is None else seed
            out[f"sharp_{name}_{eps:g}"] = batch.add(
                "eps-sharpness", [model], data, {"epsilon": eps, "subspace_dim": dim, "seed": sd},
                eps_sharpness, eps, dim, seed)
    out["lambda"] = batch.add("lambda-max", [model], data, {"tol": 1e-3, "max_iter": 100, "seed": seed},
                              top_eigenvalue, seed)
    out["trace"] = batch.add("trace", [model], data, {"method": "hutch++", "rtol": trace_rtol,
                                                      "max_hvp": TRACE_MAX_HVP, "seed": seed},
                             trace, trace_rtol, seed)
    return out


def curvature_row(units: dict[str, int], got: list[dict[str, Any]]) -> dict[str, Any]:
    """The row entries of one model from the batch's results."""
    row: dict[str, Any] = {}
    for name, i in units.items():
        row.update(got[i] if name in ("lambda", "trace") else {name: got[i]["value"]})
    return row
