"""`--plan`'s count of sharpness's Hessian-vector products follows the trace's stated
accuracy (Hutch++ stops at `trace_rtol`, so its products are a measured typical count, not an
option)."""

from __future__ import annotations

import pytest

from batchlab.experiments.base import Context
from batchlab.experiments.options import validate
from batchlab.experiments.plan import CURVATURE_HVPS, ExperimentPlan, _add_curvature
from batchlab.experiments.sharpness_units import TRACE_TYPICAL_HVPS


class _Probe:
    """Every timing is free: only the counts are under test."""

    task_threads = 1

    def __getattr__(self, name):  # hvp_seconds, eps_sharpness_seconds, ...
        return lambda *args, **kw: 0.0


def _hvps(rtol: float) -> int:
    from batchlab.experiments import get, prepared

    ctx = prepared("sharpness", Context(preset="quick", seeds=2, options={"trace_rtol": rtol}))
    unit = get("sharpness").units(ctx).curvature[0]  # 3 regimes x 2 seeds: 6 final models
    plan = ExperimentPlan("sharpness", runs=unit.models)
    _add_curvature(unit, plan, _Probe())
    return plan.curvature_hvps


@pytest.mark.parametrize("rtol", [0.07, 0.2])
def test_trace_counted_at_its_typical_products(rtol: float) -> None:
    per_model = 4 * CURVATURE_HVPS["eps-sharpness"] + CURVATURE_HVPS["lambda-max"]
    slq = validate("sharpness", {}).resolve("quick").slq_steps
    k7 = 2 * CURVATURE_HVPS["lambda-max"]
    assert _hvps(rtol) == 6 * (per_model + TRACE_TYPICAL_HVPS) + 2 * slq + k7


def test_a_tighter_target_costs_as_the_inverse_square() -> None:
    # residual probes go as 1 / rtol^2: half the tolerance, four times the trace's products
    assert _hvps(0.035) - _hvps(0.07) == 6 * 3 * TRACE_TYPICAL_HVPS


@pytest.fixture(scope="module")
def tiny():
    import torch

    from batchlab.nn.models import build_mlp

    torch.manual_seed(0)
    model = build_mlp(6, [8], 4, init="torch", seed=2).double()
    return model, (torch.randn(128, 6, dtype=torch.float64), torch.randint(0, 4, (128,)))


def test_trace_unit_stores_its_accuracy_and_products(tiny) -> None:
    from batchlab.experiments import sharpness_units as U

    model, data = tiny
    got = U.trace(model, data, 0.07, seed=0)
    assert got["trace_converged"] and 0 < got["trace_hvps"] <= U.TRACE_MAX_HVP
    # and the estimate is right: the exact trace, one product per parameter (92 of them)
    import torch

    from batchlab.measure.curvature.objective import Objective

    obj = Objective(model, data)
    n = sum(p.numel() for p in model.parameters())
    exact = float(sum(obj.hvp(torch.eye(n, dtype=torch.float64)[i])[i] for i in range(n)))
    assert abs(got["trace"] - exact) <= 4 * got["trace_se"] + 1e-9 * abs(exact)


def test_density_unit_round_trips_with_its_mixture(tiny) -> None:
    import numpy as np

    from batchlab.experiments import sharpness_units as U
    from batchlab.experiments.sharpness import _spectral

    model, data = tiny
    got = U.density(model, data, 9, seed=0)
    k, steps = U.density_split(9)
    assert (k, steps) == (6, 3) and got["deflated"] == k
    assert [len(r) for r in got["nodes"]] == [k, steps]  # the block's rule, then the probe's
    d = _spectral(got)
    atoms, p = d.measure()
    assert len(atoms) == k + steps and abs(p.sum() - 1) < 1e-9
    assert np.allclose(d.mass, got["mass"]) and d.w1_bound == got["w1_bound"]
