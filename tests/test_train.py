"""The training engine: determinism, fused == autograd, divergence, schedules, targets."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import TINY

from batchlab import train
from batchlab.config import Phase, make_config
from batchlab.errors import ConfigError
from batchlab.nn.models import build_mlp
from batchlab.probes import Probe
from batchlab.runs.executors import run_configs
from batchlab.runs.store import Store

METRICS = ("train_loss", "train_acc", "test_loss", "test_acc", "running_loss", "dist_init_w",
           "norm_w", "steps", "samples")


pytestmark = pytest.mark.usefixtures("one_thread")


def _curve(res, keys=METRICS) -> list[tuple]:
    return [tuple(e.get(k) for k in keys) for e in res.epochs]


def test_result_shape_and_epoch_zero() -> None:
    res = train(make_config(**TINY))
    assert res.status == "completed" and res.model is not None
    assert [e["epoch"] for e in res.epochs] == [0, 1, 2]
    e0, e2 = res.epochs[0], res.epochs[2]
    assert e0["steps"] == 0 and e0["dist_init_w"] == 0.0
    n = res.epochs[1]["samples"]
    assert n == 1437 and e2["samples"] == 2 * n
    assert e2["steps"] == 2 * math.ceil(n / TINY["batch_size"])
    assert e2["gap"] == pytest.approx(e2["train_acc"] - e2["test_acc"])
    assert e2["seconds"] > 0 and e2["eval_seconds"] > 0
    assert res.final["epoch"] == 2 and res.final["test_acc"] == e2["test_acc"]
    # it learned something: digits is easy
    assert e2["test_acc"] > 0.6 > 0.3 > e0["test_acc"]


def test_same_seed_same_metrics_different_seed_different() -> None:
    a = train(make_config(**TINY, seed=3))
    b = train(make_config(**TINY, seed=3))
    c = train(make_config(**TINY, seed=4))
    assert _curve(a) == _curve(b)  # bit-identical on CPU
    assert _curve(a) != _curve(c)
    for pa, pb in zip(a.model.parameters(), b.model.parameters()):
        assert torch.equal(pa, pb)


@pytest.mark.parametrize("opt", [
    dict(momentum=0.0),
    dict(momentum=0.9),
    dict(momentum=0.9, nesterov=True),
    dict(momentum=0.5, weight_decay=1e-2),
    dict(momentum=0.9, nesterov=True, weight_decay=5e-3),
])
def test_fused_engine_equals_autograd(opt: dict) -> None:
    cfg = {**TINY, "hidden": [48, 24], "epochs": 3, "lr": 0.05, **opt}
    fused = train(make_config(**cfg, engine="fused"))
    auto = train(make_config(**cfg, engine="autograd"))
    assert fused.final["engine"] == "fused" and auto.final["engine"] == "autograd"
    keys = ("train_loss", "test_loss", "running_loss", "dist_init_w")
    assert len(fused.epochs) == len(auto.epochs) == 4
    for ef, ea in zip(fused.epochs[1:], auto.epochs[1:]):
        for k in keys:
            assert ef[k] == pytest.approx(ea[k], abs=1e-5), (ef["epoch"], k)
    for pf, pa in zip(fused.model.parameters(), auto.model.parameters()):
        assert torch.allclose(pf, pa, atol=1e-5)


def test_fused_engine_refuses_what_it_cannot_do() -> None:
    with pytest.raises(ConfigError, match="fused"):
        train(make_config(**TINY, optimizer="adam", engine="fused"))


@pytest.mark.parametrize("optimizer", ["adam", "adamw"])
def test_autograd_optimizers_train(optimizer: str) -> None:
    res = train(make_config(**{**TINY, "lr": 1e-3}, optimizer=optimizer))
    assert res.final["engine"] == "autograd"
    assert res.epochs[-1]["train_loss"] < res.epochs[0]["train_loss"]


@pytest.mark.parametrize("engine", ["fused", "autograd"])
def test_divergence_is_detected_with_its_epoch(engine: str) -> None:
    # NaN needs a truly huge lr: at lr 1e3 dead ReLUs keep the loss large but finite
    res = train(make_config(**{**TINY, "epochs": 3, "lr": 1e30}, engine=engine))
    assert res.status == "diverged"
    assert res.final["diverged_epoch"] == 1
    assert len(res.epochs) == 2  # stops at the diverged epoch


def test_sweep_goes_on_after_a_divergence(store_path) -> None:
    cfgs = [make_config(**{**TINY, "lr": 1e30}), make_config(**TINY, seed=1)]
    with Store(store_path) as st:
        results = run_configs(cfgs, st)
        assert [r.status for r in results] == ["diverged", "completed"]
        stored = {r.run_id: r.status for r in st.runs()}
        assert stored == {results[0].run_id: "diverged", results[1].run_id: "completed"}
        # a diverged run is a final result: not recomputed
        again = run_configs(cfgs, st)
        assert all(r.cached for r in again)


def test_batch_size_switch_happens_exactly_at_the_phase_boundary() -> None:
    cfg = make_config(**TINY, schedule=[Phase(epochs=2, batch_size=16),
                                        Phase(epochs=1, batch_size=128, lr=0.2)])
    assert cfg.epochs == 3
    res = train(cfg)
    n = res.epochs[1]["samples"]
    per_epoch = [b["steps"] - a["steps"] for a, b in zip(res.epochs, res.epochs[1:])]
    assert per_epoch == [math.ceil(n / 16)] * 2 + [math.ceil(n / 128)]
    assert [e["batch_size"] for e in res.epochs[1:]] == [16, 16, 128]
    assert [e["lr"] for e in res.epochs[1:]] == [0.1, 0.1, 0.2]


def test_lr_multiplier_applies_from_its_epoch() -> None:
    res = train(make_config(**{**TINY, "epochs": 3}, lr_multipliers={2: 0.5, 3: 0.1}))
    assert [e["lr"] for e in res.epochs[1:]] == pytest.approx([0.1, 0.05, 0.005])


def test_target_stops_the_run() -> None:
    res = train(make_config(**{**TINY, "epochs": 10}, target_metric="train_acc",
                            target_value=0.5))
    assert res.final["target_reached"] is True
    ep = res.final["target_epoch"]
    assert ep < 10 and len(res.epochs) == ep + 1
    assert res.epochs[ep]["train_acc"] >= 0.5


def test_batch_larger_than_dataset_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="larger than the training set"):
        train(make_config(**{**TINY, "batch_size": 5000}))


@pytest.mark.parametrize("fields", [
    dict(batch_size=0), dict(batch_size=-3), dict(lr=0.0), dict(lr=-1.0),
    dict(lr=float("nan")), dict(lr=float("inf")), dict(optimizer="rmsprop"),
    dict(init="zeros"), dict(hidden=[0]), dict(bogus=1),
])
def test_bad_config_fields_are_one_line_config_errors(fields: dict) -> None:
    with pytest.raises(ConfigError) as e:
        make_config(**{**TINY, **fields})
    assert "\n" not in str(e.value)


def test_config_key_ignores_paths_and_device() -> None:
    a = make_config(**TINY, data_dir="x", device="cpu")
    b = make_config(**TINY, data_dir="y", device="auto")
    assert a.key("fp") == b.key("fp") != a.key("other")
    assert a.key("fp") != make_config(**TINY, seed=9).key("fp")


def test_glorot_init_is_seeded_and_zero_bias() -> None:
    a = build_mlp(64, [32], init="glorot", seed=1)
    b = build_mlp(64, [32], init="glorot", seed=1)
    assert torch.equal(a[0].weight, b[0].weight)
    assert float(a[0].bias.detach().abs().sum()) == 0.0
    bound = math.sqrt(6 / (64 + 32))
    assert float(a[0].weight.detach().abs().max()) <= bound


# -- keys: stores written before must still be found ------------------------------------------
def test_config_keys_are_stable() -> None:
    """Golden keys computed before the engine was split into loop + steppers: a change here
    orphans every stored run (a store rebuild), so it must be deliberate."""
    from batchlab.config import TrainConfig
    from batchlab.data import load_dataset
    from batchlab.engine.setup import get_data, resolve_device, run_key

    assert TrainConfig().key("fp") == "aea1047426aa8db2e8f852bdbdd1f5c1492feaaa6c4d71962ad999133f1ad699"
    assert TrainConfig().key() == "5d26fd6f550ca5e5c30e67ee0156b93100a8d3144e85b2e0419b645b1c9c0bbb"
    rich = make_config(dataset="digits", hidden=[32], epochs=2, batch_size=32, lr=0.1, momentum=0.9,
                       schedule=[Phase(epochs=1, batch_size=16), Phase(epochs=2, lr=0.05)],
                       lr_multipliers={2: 0.5}, probes=["geometry", "noise_scale"],
                       target_metric="test_acc", target_value=0.9, checkpoint_epochs=[0, 3])
    assert rich.key("abc123") == "a0434bf776bf598aff163042c9eee79c4cd87919bdad17d1dc5863394cd8a15a"
    fp = load_dataset("digits").fingerprint
    assert fp == "0b7e9c3202d7bcd255d6a19a238d3743bf5e320ba74812a6679958a017c55382"
    cfg = make_config(**TINY)
    assert train(cfg).key == cfg.key(fp) == (
        "e03d807891af950cc0994711ab9de5092d6a892e517639cdab7359f1fe6ba8b5")
    # a caller-supplied model enters the key through its initial weights
    user = make_config(**{**TINY, "hidden": [8], "epochs": 0, "probes": []})
    net = build_mlp(64, [8], 10, init="glorot", seed=5)
    key = "5d4d991965c951a0d264f745f64b68f5467e09203b397736b50ee5ab76a77c1a"
    assert run_key(user, get_data(user, resolve_device("cpu")), net) == key
    assert train(user, model=net).key == key


def test_a_crash_is_stored_as_failed_and_raised(store_path, monkeypatch) -> None:
    from batchlab.engine.fused import FusedMLPSGD

    def boom(self, *a, **kw):
        raise RuntimeError("boom in the step")

    monkeypatch.setattr(FusedMLPSGD, "step", boom)
    cfg = make_config(**TINY)
    with Store(store_path) as st:
        with pytest.raises(RuntimeError, match="boom in the step"):
            train(cfg, store=st)
        (rec,) = st.runs(with_epochs=True)
        assert rec.status == "failed" and "RuntimeError: boom in the step" in rec.error
        assert len(rec.epochs) == 1  # epoch 0 was measured before the crash


# -- probes see the weights at one point in every engine ----------------------------------------
class _Recorder(Probe):
    """A probe that keeps what `on_step` sees: step, weights, batch (and grads)."""

    name = "recorder"
    every_steps = 1

    def __init__(self, needs_grad: bool = False) -> None:
        self.needs_grad = needs_grad
        self.seen: list[tuple] = []

    def on_start(self, ctx) -> dict:
        self.init = [p.detach().clone() for p in ctx.model.parameters()]
        return {}

    def on_step(self, ctx, step, xb, yb) -> None:
        ps = list(ctx.model.parameters())
        grads = [p.grad.clone() for p in ps] if self.needs_grad else None
        self.seen.append((step, [p.detach().clone() for p in ps], xb.clone(), yb.clone(), grads))

    def on_epoch_end(self, ctx, epoch) -> dict:
        return {}


def _recorded(engine: str, needs_grad: bool = False, **kw) -> tuple:
    rec = _Recorder(needs_grad)
    cfg = make_config(**{**TINY, "hidden": [16], "epochs": 1, "probes": [], **kw}, engine=engine)
    res = train(cfg, probes=[rec])
    return res, rec


@pytest.mark.parametrize("opt", [dict(momentum=0.0), dict(momentum=0.9, nesterov=True)])
def test_on_step_sees_the_same_weights_in_autograd_and_fused(opt: dict) -> None:
    fres, frec = _recorded("fused", **opt)
    ares, arec = _recorded("autograd", **opt)
    assert fres.final["engine"] == "fused" and ares.final["engine"] == "autograd"
    assert [s[0] for s in frec.seen] == [s[0] for s in arec.seen] == list(
        range(1, fres.epochs[1]["steps"] + 1))
    for (s, wf, xf, yf, _), (_, wa, xa, ya, _) in zip(frec.seen, arec.seen):
        assert torch.equal(xf, xa) and torch.equal(yf, ya), s
        for a, b in zip(wf, wa):
            assert torch.allclose(a, b, atol=1e-5), s
    # the point is AFTER the step's update: step 1 already moved, the last step is the end
    assert not torch.equal(frec.seen[0][1][0], frec.init[0])
    for rec, res in ((frec, fres), (arec, ares)):
        for w, p in zip(rec.seen[-1][1], res.model.parameters()):
            assert torch.equal(w, p.detach())


def test_needs_grad_probes_get_the_pre_update_gradient() -> None:
    """Nesterov SGD overwrites `.grad` in place; the probe must still see the batch gradient at
    the weights before its step (the previous call's weights)."""
    import torch.nn.functional as F
    from torch.func import functional_call

    res, rec = _recorded("autograd", needs_grad=True, momentum=0.9, nesterov=True)
    names = [n for n, _ in res.model.named_parameters()]
    before = rec.init
    for step, weights, xb, yb, grads in rec.seen[:4]:
        params = {n: w.clone().requires_grad_(True) for n, w in zip(names, before)}
        loss = F.nll_loss(functional_call(res.model, params, (xb,)), yb)
        expect = torch.autograd.grad(loss, list(params.values()))
        for g, e in zip(grads, expect):
            assert torch.allclose(g, e, atol=1e-6), step
        before = weights


def test_vectorized_pass_shows_probes_the_same_point() -> None:
    """K = 2 stacked models: a due probe sees its own model's weights after the step, equal to
    the same config trained alone (the loop syncs the stack into the modules first)."""
    from batchlab.engine.loop import Loop
    from batchlab.engine.setup import build_model, get_data, resolve_device

    cfgs = [make_config(**{**TINY, "hidden": [16], "epochs": 1, "probes": []}, seed=s)
            for s in (0, 1)]
    device = resolve_device("cpu")
    td = get_data(cfgs[0], device)
    recs = [_Recorder(), _Recorder()]
    nets = [build_model(c, td) for c in cfgs]
    results = Loop(cfgs, nets, td, device, [[r] for r in recs], ["a", "b"]).run()
    assert all(r.final["vectorized_k"] == 2 and r.status == "completed" for r in results)
    for cfg, rec in zip(cfgs, recs):
        alone = _Recorder()
        train(cfg, probes=[alone])
        assert len(rec.seen) == len(alone.seen)
        for (s, wv, xv, _, _), (_, wa, xa, _, _) in zip(rec.seen, alone.seen):
            assert torch.equal(xv, xa), s
            for a, b in zip(wv, wa):
                assert torch.allclose(a, b, atol=1e-5), s
