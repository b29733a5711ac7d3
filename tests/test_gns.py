"""GradientNoiseScale: per-example norms from hooks against an autograd loop, the unbiased
estimators against B_simple in closed form, reductions, reporting of what is not covered."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import batchlab
from batchlab.errors import BatchlabError
from batchlab.measure.gns import GradientNoiseScale, mccandlish_estimates

pytestmark = pytest.mark.usefixtures("one_thread")


def loop_sq_norms(model: nn.Module, loss_fn, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """|g_i|^2 by one autograd backward per example (the reference)."""
    params = [p for p in model.parameters() if p.requires_grad]
    out = []
    for i in range(len(x)):
        gs = torch.autograd.grad(loss_fn(model(x[i:i + 1]), y[i:i + 1]), params)
        out.append(sum(g.pow(2).sum() for g in gs))
    return torch.stack(out)


def hook_sq_norms(model: nn.Module, loss_fn, x: torch.Tensor, y: torch.Tensor,
                  reduction: str = "sum") -> torch.Tensor:
    with GradientNoiseScale(model, reduction=reduction) as gns:
        model.zero_grad()
        loss_fn(model(x), y).backward()
        gns.step()
        assert gns.coverage == 1.0 and not gns.unsupported
        return gns.last_sq_norms


class SeqNet(nn.Module):
    """Linear layers on [B, T, d] inputs (both the Gram and the explicit branch) and a Conv1d."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv1d(3, 6, 3, stride=2, padding=2, dilation=2, padding_mode="circular")
        self.wide = nn.Linear(6, 12)  # T = 4: T (6+12) <= 72: Gram form
        self.narrow = nn.Linear(12, 2, bias=False)  # T (12+2) > 24: explicit gradient
        self.head = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.conv(x)).transpose(1, 2)  # [B, T, 6]
        h = self.narrow(torch.tanh(self.wide(h)))  # [B, T, 2]
        return self.head(h.flatten(1))


def conv_net() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(2, 4, 3, stride=2, padding=1, groups=2, padding_mode="reflect"), nn.Tanh(),
        nn.Conv2d(4, 3, 2, padding="same", dilation=2, bias=False), nn.ReLU(inplace=True),
        nn.Flatten(), nn.Linear(3 * 4 * 4, 5))


@pytest.mark.parametrize("make, shape", [(conv_net, (2, 8, 8)), (SeqNet, (3, 7))])
def test_hook_norms_equal_per_example_autograd(make, shape):
    torch.manual_seed(0)
    model = make().double()
    x = torch.randn(6, *shape, dtype=torch.float64)
    y = torch.randint(0, 4, (6,))

    def loss(out, t, reduction="sum"):
        return F.cross_entropy(out, t, reduction=reduction)

    want = loop_sq_norms(model, loss, x, y)
    got = hook_sq_norms(model, loss, x, y)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    got_mean = hook_sq_norms(model, lambda o, t: loss(o, t, "mean"), x, y, reduction="mean")
    torch.testing.assert_close(got_mean, want, rtol=1e-10, atol=1e-12)


def test_frozen_parameters_are_not_in_the_norms():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2)).double()
    model[0].weight.requires_grad_(False)
    x, y = torch.randn(5, 4, dtype=torch.float64), torch.randn(5, 2, dtype=torch.float64)

    def loss(o, t):
        return F.mse_loss(o, t, reduction="sum")

    torch.testing.assert_close(hook_sq_norms(model, loss, x, y), loop_sq_norms(model, loss, x, y))


def linear_problem(n: int = 4096, d: int = 5, k: int = 3, seed: int = 0):
    """Multi-output linear regression at a fixed, non-optimal point: per-example gradients
    g_i = r_i (x) [x_i, 1] with residual r_i = W x_i + b - y_i, known in closed form."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64) * torch.linspace(0.5, 2.0, d, dtype=torch.float64)
    w_true = torch.randn(k, d, generator=g, dtype=torch.float64)
    y = x @ w_true.T + 0.5 * torch.randn(n, k, generator=g, dtype=torch.float64)
    model = nn.Linear(d, k).double()
    with torch.no_grad():
        model.weight.copy_(w_true + 0.3 * torch.randn(k, d, generator=g, dtype=torch.float64))
        model.bias.fill_(0.2)
        r = model(x) - y  # d(0.5 |r|^2)/d(out)
    per_example = torch.cat([(r[:, :, None] * x[:, None, :]).flatten(1), r], dim=1)  # [n, k*d + k]
    big = per_example.mean(0)
    exact = (per_example.pow(2).sum(1).mean() - big.pow(2).sum()) / big.pow(2).sum()
    return model, x, y, float(exact)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_recovers_closed_form_b_simple_on_a_linear_model(reduction):
    model, x, y, exact = linear_problem()
    assert 5 < exact < 200  # a regime where both |G|^2 and tr(Sigma) matter at B = 64
    gns = GradientNoiseScale(model, reduction=reduction, beta=0.998)
    gen = torch.Generator().manual_seed(1)
    for _ in range(600):  # the model is never updated: every batch sees the same B_simple
        idx = torch.randint(0, len(x), (64,), generator=gen)  # iid draws, as the estimator assumes
        model.zero_grad()
        per = 0.5 * (model(x[idx]) - y[idx]).pow(2).sum(1)
        (per.mean() if reduction == "mean" else per.sum()).backward()
        gns.step()
    assert gns.b_simple == pytest.approx(exact, rel=0.10)
    last = gns.history[-1]
    assert last.b_simple == gns.b_simple and last.batch_size == 64 and last.step == 599
    assert gns.trace_sigma / gns.grad_sq == pytest.approx(gns.b_simple)


def test_mean_and_sum_reduction_give_the_same_b_simple():
    results = []
    for reduction in ("mean", "sum"):
        torch.manual_seed(0)
        model = conv_net().double()
        gns = GradientNoiseScale(model, reduction=reduction)
        gen = torch.Generator().manual_seed(3)
        for _ in range(5):
            x = torch.randn(16, 2, 8, 8, generator=gen, dtype=torch.float64)
            y = torch.randint(0, 5, (16,), generator=gen)
            model.zero_grad()
            F.cross_entropy(model(x), y, reduction=reduction).backward()
            gns.step()
        results.append([v for r in gns.history for v in (r.grad_sq, r.trace_sigma, r.b_simple)])
    assert results[0] == pytest.approx(results[1], rel=1e-9)


def test_estimators_are_the_papers():
    # E|G_B|^2 = |G|^2 + tr(Sigma)/B: feed exact expectations, get the parts back
    g2, tr = 2.0, 30.0
    assert mccandlish_estimates(g2 + tr, g2 + tr / 64, 1, 64) == pytest.approx((g2, tr))


def test_unsupported_layers_are_reported_not_skipped():
    model = nn.Sequential(nn.Embedding(10, 4), nn.Flatten(), nn.Linear(12, 6), nn.BatchNorm1d(6),
                          nn.LayerNorm(6), nn.Linear(6, 2))
    with pytest.warns(RuntimeWarning, match="BatchNorm1d") as rec:
        gns = GradientNoiseScale(model)
    assert set(gns.unsupported) == {"3"}  # Embedding and LayerNorm have rules now
    assert "Embedding" not in str(rec[0].message) and "LayerNorm" not in str(rec[0].message)
    assert gns.covered == ["0", "2", "4", "5"]
    covered = 40 + 12 * 6 + 6 + 12 + 6 * 2 + 2
    assert gns.coverage == pytest.approx(covered / (covered + 12))
    model(torch.randint(0, 10, (8, 3))).sum().backward()
    gns.step()
    assert math.isfinite(gns.history[0].g_small_sq)


def test_layers_used_functionally_or_twice_are_reported_at_run_time():
    class Odd(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.twice = nn.Linear(4, 4)
            self.functional = nn.Linear(4, 4)
            self.head = nn.Linear(4, 1)

        def forward(self, x):
            h = self.twice(torch.tanh(self.twice(x)))
            return self.head(F.linear(h, self.functional.weight, self.functional.bias))

    model = Odd()
    gns = GradientNoiseScale(model)
    model(torch.randn(8, 4)).sum().backward()
    with pytest.warns(RuntimeWarning) as rec:
        gns.step()
    assert set(gns.unsupported) == {"twice", "functional"} and gns.covered == ["head"]
    assert len(rec) == 2
    assert "2 times" in gns.unsupported["twice"] and "functionally" in gns.unsupported["functional"]


def test_batch_of_one_and_zero_gradients_do_not_crash():
    model = nn.Linear(3, 1)
    nn.init.zeros_(model.weight)
    nn.init.zeros_(model.bias)
    gns = GradientNoiseScale(model)
    model(torch.randn(1, 3)).sum().backward()
    gns.step()
    assert math.isnan(gns.history[0].grad_sq) and math.isnan(gns.b_simple)
    model.zero_grad()
    F.mse_loss(model(torch.randn(4, 3)), torch.zeros(4, 1)).backward()  # all gradients are zero
    gns.step()
    rec = gns.history[-1]
    assert rec.g_small_sq == 0 and rec.g_big_sq == 0 and math.isnan(rec.b_simple)


def test_misuse_is_a_clear_error():
    model = nn.Linear(3, 1)
    with pytest.raises(BatchlabError, match="reduction"):
        GradientNoiseScale(model, reduction="none")
    with pytest.raises(BatchlabError, match="no layer"):
        GradientNoiseScale(nn.Sequential(nn.BatchNorm1d(3)))
    gns = GradientNoiseScale(model)
    with pytest.raises(BatchlabError, match="no backward"):
        gns.step()
    for _ in range(2):
        model(torch.randn(4, 3)).sum().backward()
    with pytest.raises(BatchlabError, match="2 backward passes"):
        gns.step()
    flat = nn.Sequential(nn.Conv1d(2, 3, 1), nn.Flatten(0, 1), nn.Linear(5, 1))  # folds T into B
    gns = GradientNoiseScale(flat)
    flat(torch.randn(4, 2, 5)).sum().backward()
    with pytest.raises(BatchlabError, match="different batch sizes"):
        gns.step()


def test_every_k_steps_and_public_export():
    assert batchlab.GradientNoiseScale is GradientNoiseScale
    model = nn.Linear(3, 2)
    gns = GradientNoiseScale(model, every=3)
    for _ in range(7):
        model.zero_grad()
        model(torch.randn(8, 3)).pow(2).mean().backward()
        gns.step()
    assert [r.step for r in gns.history] == [0, 3, 6]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        gns.close()


def test_lightning_callback_logs_b_simple(tmp_path):
    pl = pytest.importorskip("lightning.pytorch")
    import csv

    from batchlab.integrations.lightning import GradientNoiseScaleCallback

    class Regression(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 1))

        def training_step(self, batch, _):
            x, y = batch
            return F.mse_loss(self.net(x), y)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.01)

    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 5, generator=g)
    y = x.sum(1, keepdim=True) + 0.1 * torch.randn(256, 1, generator=g)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=32)
    cb = GradientNoiseScaleCallback(log_every=1)  # the default logs every 50th step (no sync)
    trainer = pl.Trainer(max_steps=8, accelerator="cpu", logger=pl.loggers.CSVLogger(tmp_path),
                         callbacks=[cb], log_every_n_steps=1, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(Regression(), loader)
    with open(trainer.logger.experiment.metrics_file_path) as f:
        rows = list(csv.DictReader(f))
    logged = [float(r["gns/b_simple"]) for r in rows if r.get("gns/b_simple")]
    assert len(logged) == 8 and all(math.isfinite(v) and v > 0 for v in logged)
    assert logged[-1] == pytest.approx(cb.gns.b_simple)
    assert len(cb.gns.history) == 8 and cb.gns.coverage == 1.0


def test_opacus_backend_covers_more_layers_exactly():
    pytest.importorskip("opacus")

    class Mixed(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = nn.Embedding(7, 4)
            self.norm = nn.LayerNorm(4)
            self.group = nn.GroupNorm(3, 3)
            self.head = nn.Linear(12, 2)

        def forward(self, idx):
            h = self.norm(self.emb(idx))  # [B, 3, 4]
            return self.head(self.group(h).flatten(1))

    torch.manual_seed(0)
    model = Mixed().double()
    idx, y = torch.randint(0, 7, (5, 3)), torch.randn(5, 2, dtype=torch.float64)

    def loss(o, t):
        return F.mse_loss(o, t, reduction="sum")

    want = loop_sq_norms(model, loss, idx, y)
    with pytest.warns(RuntimeWarning, match="GroupNorm"), GradientNoiseScale(model) as own:
        assert own.coverage < 1.0  # batchlab's own rules: all but the GroupNorm
        assert list(own.unsupported) == ["group"]
    gns = GradientNoiseScale(model, reduction="sum", backend="opacus")
    assert gns.coverage == 1.0 and not gns.unsupported
    loss(model(idx), y).backward()
    gns.step()
    torch.testing.assert_close(gns.last_sq_norms, want)
    with pytest.warns(RuntimeWarning, match="BatchNorm1d"):
        GradientNoiseScale(nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3)), backend="opacus")
