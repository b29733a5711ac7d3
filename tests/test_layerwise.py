"""LARS / CBLR / MCLR and small-loss discarding."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import TINY

from batchlab.config import make_config
from batchlab.engine.steppers import AutogradStepper
from batchlab.measure import curvature as C
from batchlab.nn.layerwise import CBLR, LARS, MCLR, curvature_factors
from batchlab.nn.models import build_mlp
from batchlab.nn.optim import layer_groups
from batchlab.runs.training import train

pytestmark = pytest.mark.usefixtures("one_thread")


def _setup(seed: int = 0):
    torch.manual_seed(seed)
    model = build_mlp(6, [5], 3, init="torch", seed=seed).double()
    x = torch.randn(32, 6, dtype=torch.float64)
    y = torch.randint(0, 3, (32,))
    return model, x, y


def _grads(model, x, y):
    model.zero_grad()
    F.nll_loss(model(x), y).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def test_lars_one_step_matches_hand_computation():
    model, x, y = _setup()
    with torch.no_grad():
        model[0].bias.zero_()  # a zero-norm tensor: factor eta by convention
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    g = _grads(model, x, y)
    lr, wd, eta = 0.5, 0.01, 0.1
    opt = LARS(layer_groups(model), lr=lr, weight_decay=wd, trust_coefficient=eta)
    opt.step()
    for n, p in model.named_parameters():
        w = before[n]
        wn, gn = w.norm().item(), g[n].norm().item()
        ratio = eta * wn / (gn + wd * wn) if wn > 0 and gn > 0 else eta
        want = w - lr * ratio * (g[n] + wd * w)
        assert torch.allclose(p.detach(), want, atol=1e-12), n
    assert opt.last_factors["layer1.1"] == pytest.approx(eta)
    assert opt.last_factors["layer1.0"] != pytest.approx(eta)


def test_cblr_uses_block_curvature():
    model, x, y = _setup(1)
    opt = CBLR(layer_groups(model), lr=0.1, curvature_every=5)
    opt.on_step_begin(model, x, y, step=0)
    exact = C.hessian_eigenvalues(model, (x, y), per_layer=True, tol=1e-8, max_iter=200)
    for name, lam in opt.curvatures.items():
        assert lam == pytest.approx(exact[name].top, rel=0.05)
    before = [p.detach().clone() for p in model.parameters()]
    g = _grads(model, x, y)
    opt.step()
    lam = opt.curvatures
    fac = curvature_factors(lam)
    med = sorted(lam.values())[0]  # two layers: the lower median
    assert fac == {k: pytest.approx(med / v) for k, v in lam.items()}
    for (n, p), w in zip(model.named_parameters(), before):
        layer = "layer1" if n.startswith("0.") else "layer2"
        assert torch.allclose(p.detach(), w - 0.1 * fac[layer] * g[n], atol=1e-12)
    assert len({round(v, 9) for v in fac.values()}) == 2  # the layers get different lrs
    curv = dict(opt.curvatures)
    opt.on_step_begin(model, x, y, step=3)  # not a refresh step
    assert opt.curvatures == curv


def test_mclr_median_secant_curvature():
    model, x, y = _setup(2)
    g = _grads(model, x, y)
    kap = {f"layer{i + 1}": float((g[f"{j}.weight"].abs() / model[j].weight.detach().abs())
                                  .median())
           for i, j in enumerate((0, 2))}
    opt = MCLR(layer_groups(model), lr=0.1)
    opt.step()
    assert opt.curvatures == pytest.approx(kap, rel=1e-12)
    fac = curvature_factors(opt.curvatures)
    assert opt.last_factors["layer1.0"] == pytest.approx(fac["layer1"])
    assert opt.last_factors["layer2.0"] == pytest.approx(fac["layer2"])
    assert fac["layer1"] != pytest.approx(fac["layer2"])


def test_curvature_factors_floor_nonpositive():
    fac = curvature_factors({"a": 10.0, "b": -1.0, "c": 1.0})
    assert fac["b"] == pytest.approx(1.0 / (1e-3 * 10.0))
    assert fac["c"] == 1.0


@pytest.mark.parametrize("opt", ["lars", "cblr", "mclr"])
def test_train_with_layerwise_optimizers(opt):
    res = train({**TINY, "optimizer": opt, "curvature_every": 5, "momentum": 0.9,
                 "probes": [], "lr": 0.05 if opt != "lars" else 1.0,
                 "trust_coefficient": 0.01})
    assert res.status == "completed"
    assert res.final["engine"] == "autograd"
    assert res.final["train_acc"] > 0.5


def test_discard_fraction_drops_lowest_loss_samples():
    model, x, y = _setup(3)
    cfg = make_config(**{**TINY, "discard_fraction": 0.25, "lr": 1.0, "probes": []})
    stepper = AutogradStepper(cfg, model)
    before = [p.detach().clone() for p in model.parameters()]
    with torch.no_grad():
        per = F.nll_loss(model(x), y, reduction="none")
    keep = per.argsort(descending=True)[:24]  # the 24 highest-loss of 32 samples
    ref = build_mlp(6, [5], 3, init="torch", seed=3).double()
    ref.load_state_dict(model.state_dict())
    F.nll_loss(ref(x[keep]), y[keep]).backward()
    reported = stepper.step(x.unsqueeze(0), y.unsqueeze(0), [1.0])
    assert float(reported) == pytest.approx(float(per.mean()))  # the loss of the whole batch
    for p, w, r in zip(model.parameters(), before, ref.parameters()):
        assert torch.allclose(p.detach(), w - r.grad, atol=1e-12)
    # and the dropped samples really do not matter: replacing them by other low-loss samples
    # (copies of the lowest-loss one, still dropped) leaves the step unchanged
    drop = per.argsort()[:8]
    x2, y2 = x.clone(), y.clone()
    x2[drop], y2[drop] = x[drop[0]], y[drop[0]]
    model2, _, _ = _setup(3)
    AutogradStepper(cfg, model2).step(x2.unsqueeze(0), y2.unsqueeze(0), [1.0])
    for p, q in zip(model.parameters(), model2.parameters()):
        assert torch.equal(p.detach(), q.detach())


def test_steplengths_probe_plain_sgd():
    """Plain SGD: the update length of a step is exactly lr x its gradient norm."""
    res = train({**TINY, "epochs": 1, "probes": ["steplengths"]})
    e = res.epochs[1]
    assert e["step_update_norm"] == pytest.approx(TINY["lr"] * e["step_grad_norm"], rel=1e-5)
    assert e["step_loss_update"] < 0.5
    assert {"curv_layer1", "curv_layer2"} <= set(e)
