"""Gradient noise scale: exactness of per-example gradients, unbiasedness of the estimators on a
problem whose noise scale is known in closed form, and the training probes."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from batchlab.config import make_config
from batchlab.measure import noise
from batchlab.measure.noise_curvature import b_noise
from batchlab.measure.noise_two_batch import b_simple_two_batch
from batchlab.nn.models import build_mlp
from batchlab.runs.training import train

TINY = dict(dataset="digits", hidden=[32], epochs=2, batch_size=32, lr=0.1)  # trains in < 1 s


def _b_simple_direct(g: torch.Tensor) -> float:
    """The textbook formula on an explicit [n, P] matrix of per-example gradients."""
    g = g.double()
    n = g.shape[0]
    mean = g.mean(0)
    tr = float(((g - mean) ** 2).sum()) / (n - 1)
    g2 = float(mean @ mean) - tr / n
    return tr / g2


def test_vmap_per_example_grads_equal_loop():
    net = build_mlp(8, [16, 12], 3, seed=1)
    x = torch.randn(37, 8, generator=torch.Generator().manual_seed(0))
    y = torch.randint(0, 3, (37,), generator=torch.Generator().manual_seed(1))
    loop = noise.per_example_grads_loop(net, x, y)
    vm = torch.cat(list(noise.per_example_grads(net, x, y, chunk=5)))  # ragged last chunk
    assert vm.shape == loop.shape == (37, noise.n_params(net))
    torch.testing.assert_close(vm, loop, rtol=1e-5, atol=1e-6)
    ref = _b_simple_direct(loop)
    for method in ("vmap", "linear"):
        sq = noise.per_example_sq_norms(net, x, y, method=method)
        torch.testing.assert_close(sq, loop.double().pow(2).sum(1), rtol=1e-5, atol=1e-7)
        est = noise.b_simple(net, x, y, method=method, n_boot=200)
        assert est.b_simple == pytest.approx(ref, rel=1e-5)
        assert est.ci[0] < est.ci[1]


def test_linear_fast_path_refuses_non_linear_models():
    net = nn.Sequential(nn.Conv1d(1, 2, 3), nn.Flatten(), nn.Linear(12, 3), nn.LogSoftmax(-1))
    assert not noise.linear_only(net)
    x, y = torch.randn(6, 1, 8), torch.randint(0, 3, (6,))
    # "auto" falls back to vmap and still matches the loop
    ref = noise.per_example_grads_loop(net, x, y).double().pow(2).sum(1)
    torch.testing.assert_close(noise.per_example_sq_norms(net, x, y), ref, rtol=1e-5, atol=1e-7)


# -- linear regression with Gaussian inputs and label noise -----------------------------------
# x ~ N(0, I_d), y = x.w* + eps, eps ~ N(0, s^2), loss 0.5 (x.w - y)^2, u = w - w*:
#   G = u,  E|g|^2 = (d + 2)|u|^2 + d s^2,  tr(Sigma) = (d + 1)|u|^2 + d s^2,  H = I
#   => B_simple = B_noise = ((d + 1)|u|^2 + d s^2) / |u|^2.
D, SIGMA = 10, 1.0


def _mse(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return 0.5 * (out.squeeze(-1) - y).pow(2).mean()


@pytest.fixture(scope="module")
def regression():
    g = torch.Generator().manual_seed(0)
    w_star = torch.randn(D, generator=g)
    x = torch.randn(60_000, D, generator=g)
    y = x @ w_star + SIGMA * torch.randn(60_000, generator=g)
    model = nn.Linear(D, 1, bias=False)
    u = torch.randn(D, generator=g)
    u = u / u.norm()  # |u| = 1
    with torch.no_grad():
        model.weight.copy_((w_star + u).unsqueeze(0))
    true = ((D + 1) * 1.0 + D * SIGMA**2) / 1.0
    return model, x, y, true


def test_estimators_agree_with_closed_form(regression):
    model, x, y, true = regression
    per = noise.b_simple(model, x[:4000], y[:4000], loss_fn=_mse, n_boot=500, seed=1)
    two = b_simple_two_batch(model, x[4000:], y[4000:], b_small=16, b_big=256,
                                   n_batches=200, loss_fn=_mse, seed=2)
    assert per.ci[0] <= true <= per.ci[1]
    assert two.ci[0] <= true <= two.ci[1]
    assert per.b_simple == pytest.approx(true, rel=0.15)
    assert two.b_simple == pytest.approx(true, rel=0.15)
    # the two estimators agree within the per-example estimate's confidence interval
    assert per.ci[0] <= two.b_simple <= per.ci[1]
    assert per.grad_sq == pytest.approx(1.0, rel=0.25)
    assert per.trace_sigma == pytest.approx(true - 0.0, rel=0.1)


def test_b_noise_equals_b_simple_when_hessian_is_identity(regression):
    model, x, y, true = regression
    cn = b_noise(model, x[:400], y[:400], x[-20_000:], y[-20_000:], loss_fn=_mse)
    assert cn.b_noise == pytest.approx(true, rel=0.3)
    assert cn.eps_max == pytest.approx(1.0, rel=0.3)  # |G|^2 / G^T H G with H ~ I
    assert cn.eps_opt(1e9) == pytest.approx(cn.eps_max, rel=1e-6)  # saturates at eps_max
    assert cn.eps_opt(true) == pytest.approx(cn.eps_max / (1 + cn.b_noise / true))


def test_two_batch_rejects_bad_sizes(regression):
    model, x, y, _ = regression
    with pytest.raises(ValueError):
        b_simple_two_batch(model, x, y, b_small=10, b_big=25, n_batches=2, loss_fn=_mse)


# -- probes ---------------------------------------------------------------------------------
def test_noise_scale_probe_tracks_b_simple_during_training():
    from batchlab.probes.noise_scale import NoiseScaleProbe

    probe = NoiseScaleProbe(every_steps=20, n_examples=128)
    res = train(make_config(**{**TINY, "epochs": 3, "probes": []}), probes=[probe])
    assert res.final["engine"] == "fused"  # the probe computes its own gradients
    vals = [e.get("b_simple") for e in res.epochs]
    assert all(v is not None and v > 0 for v in vals)
    end1 = res.epochs[1]["steps"]
    pts = [(h["trace_sigma"], h["grad_sq"]) for h in probe.history if 0 < h["step"] <= end1]
    assert res.epochs[1]["b_simple_avg"] == pytest.approx(noise.averaged(pts).b_simple)
    assert [h["step"] for h in probe.history[:3]] == [0.0, 20.0, 40.0]
    # the loss on the probe sample falls while training
    assert probe.history[-1]["loss"] < probe.history[0]["loss"]


def test_target_step_probe_is_finer_than_epochs():
    cfg = make_config(**{**TINY, "epochs": 5, "probes": ["target_step"],
                         "target_metric": "test_acc", "target_value": 0.8})
    res = train(cfg)
    steps = [e["target_step"] for e in res.epochs if e.get("target_step") is not None
             and math.isfinite(e["target_step"])]
    assert res.final["target_reached"]
    assert steps and steps[0] <= res.final["target_steps"]
