"""Hutch++ and the variance-stopped Hutchinson against the exact trace of a small MLP's
Hessian (float64, torch.func.hessian)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.func import hessian

from batchlab.errors import BatchlabError
from batchlab.measure import curvature as C
from batchlab.nn.models import build_mlp

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def small():
    torch.manual_seed(0)
    model = build_mlp(6, [8], 4, init="torch", seed=2).double()
    X = torch.randn(128, 6, dtype=torch.float64)
    y = torch.randint(0, 4, (128,))
    obj = C.Objective(model, (X, y))

    def f(theta: torch.Tensor) -> torch.Tensor:
        return obj.batch_loss(theta, X, y) / len(y)

    H = hessian(f)(obj.theta.clone())
    return model, (X, y), float(torch.trace(H))


def test_hutchpp_unbiased_and_accurate(small):
    model, data, exact = small
    ests = [C.hessian_trace(model, data, method="hutch++", rtol=0.02, seed=s).estimate
            for s in range(40)]
    errs = np.abs(np.asarray(ests) - exact) / abs(exact)
    # mean of 40 runs, each with a 95% half-width <= 2%: within ~0.6% (3 sd) if unbiased
    assert abs(np.mean(ests) - exact) <= 0.01 * abs(exact)
    assert np.mean(errs <= 0.02) >= 0.8


def test_stopping_rule_honours_rtol(small):
    model, data, exact = small
    from batchlab.measure.curvature.trace import MIN_BLOCKS, t_quantile

    r = C.hessian_trace(model, data, method="hutch++", rtol=0.01, seed=5)
    assert r.converged and r.method == "hutch++"
    # the rule: the 95% t interval over the residual probes, and never before two blocks
    assert t_quantile(0.95, r.n_samples - 1) * r.stderr <= 0.01 * abs(r.estimate)
    assert r.n_samples >= MIN_BLOCKS * 8
    assert r.n_hvp <= 10_000 and r.sketch_rank > 0
    assert abs(r.estimate - exact) <= 0.03 * abs(exact)
    h = C.hessian_trace(model, data, method="hutchinson", rtol=0.01, seed=5)
    assert t_quantile(0.95, h.n_samples - 1) * h.stderr <= 0.01 * abs(h.estimate)
    assert r.n_hvp < h.n_hvp  # the sketch takes the dominant eigenvalues' share exactly


def test_t_quantile_is_wider_than_normal_for_few_probes():
    from batchlab.measure.curvature.trace import normal_quantile, t_quantile

    assert t_quantile(0.95, 15) == pytest.approx(2.131, abs=1e-3)
    assert t_quantile(0.95, 15) > t_quantile(0.95, 100) > normal_quantile(0.95)


def test_budget_exhausted_is_reported(small):
    model, data, _ = small
    r = C.hessian_trace(model, data, method="hutchinson", rtol=1e-6, max_hvp=32, seed=0)
    assert not r.converged and r.n_hvp == 32


def test_deterministic_given_seed(small):
    model, data, _ = small
    a = C.hessian_trace(model, data, method="hutch++", rtol=0.01, seed=7)
    b = C.hessian_trace(model, data, method="hutch++", rtol=0.01, seed=7, probes_per_pass=3)
    assert a.estimate == pytest.approx(b.estimate, rel=1e-12) and a.n_hvp == b.n_hvp
    c = C.hessian_trace(model, data, method="hutch++", rtol=0.01, seed=8)
    assert c.estimate != a.estimate


@pytest.mark.parametrize("kw", [dict(method="xtrace"), dict(method="hutch++", rtol=0),
                                dict(method="hutch++", rtol=-1), dict(rtol=0.01, confidence=1),
                                dict(method="hutch++", max_hvp=3),
                                dict(method="hutch++", block=1)])
def test_bad_arguments(small, kw):
    model, data, _ = small
    with pytest.raises(BatchlabError) as e:
        C.hessian_trace(model, data, **kw)
    assert "\n" not in str(e.value)
