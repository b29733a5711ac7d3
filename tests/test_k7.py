"""K7 (the safe lr is limited by the curvature) as an lr sweep to divergence, on planted cases
whose answer is known: linear least squares, where gradient descent is stable exactly while
lr < 2 / lambda_max of X^T X / n, so the sweep must bracket 2 / lambda_max between two grid
neighbours and the claim must come out reproduced; open brackets make it untestable; a limit
far from 2 / lambda_max makes it not_reproduced."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

from batchlab.errors import ConfigError
from batchlab.experiments import stability as K7
from batchlab.experiments.claims import Claim, check_document, claims_document
from batchlab.measure import stability as S

SEEDS = (0, 1, 2)


def half_mse(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """0.5 mean squared error: its Hessian in the weights of a linear model is X^T X / n."""
    return 0.5 * ((out.squeeze(-1) - y) ** 2).mean()


def least_squares(lam: float, seed: int, n: int = 64, d: int = 8
                  ) -> tuple[nn.Module, tuple[torch.Tensor, torch.Tensor]]:
    """A linear model at w = 0 and data whose X^T X / n has top eigenvalue exactly `lam` (the
    others 0.6 lam down to 0.05 lam); the target puts most of the initial error on the top
    eigenvector, so a run above 2 / lam blows up within a few dozen steps."""
    g = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(n, d, generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    eig = torch.tensor([lam] + list(torch.linspace(0.6, 0.05, d - 1) * lam), dtype=torch.float64)
    x = math.sqrt(n) * u @ torch.diag(eig.sqrt()) @ v.T
    w_star = v @ torch.tensor([1.0] + [0.3] * (d - 1), dtype=torch.float64)
    model = nn.Linear(d, 1, bias=False)
    with torch.no_grad():
        model.weight.zero_()
    return model, (x.float(), (x @ w_star).float())


def limit_between_grid_points(seed: int) -> float:
    """lambda with 2 / lambda = 2^(0.125 + 0.05 seed): between the grid lrs 1 and 2^(1/4), so
    lr_max must be 1 and the first diverging lr 2^(1/4), and each seed's ratio differs."""
    return 2.0 / 2.0 ** (0.125 + 0.05 * seed)


def _clean(claim: Claim) -> dict:
    doc = json.loads(json.dumps(claims_document([claim.to_json()])))
    assert check_document(doc) == []
    return doc["claims"][0]


def _sweeps(**kw: float) -> list[dict]:
    out = []
    for s in SEEDS:
        model, data = least_squares(limit_between_grid_points(s), s)
        out.append({"seed": s, **K7.sweep(model, data, s, 200, criterion=half_mse, **kw)})
    return out


def test_sweep_brackets_two_over_lambda_on_least_squares() -> None:
    sweeps = _sweeps()
    for s, sw in zip(SEEDS, sweeps):
        lam = limit_between_grid_points(s)
        assert sw["lambda_max"] == pytest.approx(lam, rel=1e-3)
        assert sw["censored"] is None
        assert sw["lr_max"] == pytest.approx(1.0)
        assert sw["lr_diverged"] == pytest.approx(2 ** 0.25)
        assert sw["lr_max"] < 2 / lam < sw["lr_diverged"]
        assert [r["diverged"] for r in sw["runs"]] == [False] * (len(sw["runs"]) - 1) + [True]
        assert sw["grid"][0] >= K7.GRID_LOW * 2 / lam
    c = _clean(K7.k7_claim(sweeps))
    assert c["verdict"] == "reproduced" and c["n"] == 3
    ratios = [sw["ratio"] for sw in sweeps]
    assert c["estimate"] == pytest.approx(math.exp(sum(map(math.log, ratios)) / 3))
    assert 2 ** -0.25 < min(ratios) <= max(ratios) < 1
    per_seed = c["evidence"]["per_seed"]
    assert [p["lr_max"] for p in per_seed] == [sw["lr_max"] for sw in sweeps]
    assert all(p["runs"] and p["lambda_max"] > 0 for p in per_seed)


def test_open_bracket_makes_k7_untestable() -> None:
    """A grid that stops below the limit (nothing diverges) or starts above it (everything
    diverges) has no lr_max: the claim is untestable (regime), not decided on the rest."""
    none = _sweeps(high=0.9)
    # lr_max is then only a lower bound (the top of the grid) and gives no ratio
    assert all(sw["censored"] == "none diverged" and sw["lr_max"] == sw["grid"][-1]
               and sw["ratio"] is None for sw in none)
    first = _sweeps(low=1.5)
    assert all(sw["censored"] == "smallest diverged" and len(sw["runs"]) == 1
               and sw["lr_max"] is None for sw in first)
    for sweeps in (none, first, _sweeps()[:2] + none[2:]):
        c = _clean(K7.k7_claim(sweeps))
        assert c["verdict"] == "untestable" and c["reason"]["code"] == "regime"
        assert "bracketed" in c["reason"]["text"]
        assert c["gates"][0]["passed"] is False


def test_limit_far_from_curvature_is_not_reproduced() -> None:
    """Seeds that survive 3-5x the quadratic limit (as a catapult can): not_reproduced."""
    sweeps = [{"seed": s, "lambda_max": 4.0, "lr_max": r / 2, "lr_diverged": r / 2 * 1.19,
               "censored": None, "ratio": r, "runs": []} for s, r in zip(SEEDS, (3.0, 4.0, 5.0))]
    c = _clean(K7.k7_claim(sweeps))
    assert c["verdict"] == "not_reproduced"
    assert c["gates"][0]["passed"] is True
    assert _clean(K7.k7_claim(None))["reason"]["code"] == "unmeasured"


def test_gd_run_rule_and_grid() -> None:
    model, data = least_squares(2.0, 0)
    before = model.weight.detach().clone()
    stable = S.gd_run(model, data, 0.9, 50, criterion=half_mse)
    assert not stable.diverged and stable.final_loss_ratio < 1e-2
    blown = S.gd_run(model, data, 1.2, 200, criterion=half_mse)
    assert blown.diverged and blown.max_loss_ratio > 2 and blown.steps_run < 200
    assert torch.equal(model.weight, before)  # the sweep never changes the model
    grid = S.log_grid(0.3, 2.0)
    assert grid[0] == pytest.approx(2 ** -1.5) and grid[-1] == pytest.approx(2.0)
    assert all(b / a == pytest.approx(2 ** 0.25) for a, b in zip(grid, grid[1:]))
    with pytest.raises(ConfigError):
        S.log_grid(2.0, 1.0)
