"""Vectorized training (several configs in one pass) must equal sequential `train()` up to float
rounding, and store the very same runs."""

from __future__ import annotations

import logging
import math

import pytest
import torch

from batchlab.config import make_config
from batchlab.engine.result import TrainResult
from batchlab.engine.setup import get_data, resolve_device
from batchlab.engine.vectorized import MAX_K, MAX_VECTORIZED_BATCH, stack_groups, train_group
from batchlab.runs.executors import run_configs
from batchlab.runs.store import Store
from batchlab.runs.training import train, train_many

BASE = dict(dataset="digits", hidden=[32], epochs=3, batch_size=32, lr=0.1)
TIMING = {"seconds", "eval_seconds", "train_seconds_total", "vectorized_k"}
RTOL, ATOL = 1e-5, 1e-6


pytestmark = pytest.mark.usefixtures("one_thread")


def _cfg(**kw):
    return make_config(**{**BASE, **kw})


def _assert_same(vec: TrainResult, seq: TrainResult) -> None:
    assert vec.key == seq.key and vec.run_id == seq.run_id
    assert vec.status == seq.status
    assert len(vec.epochs) == len(seq.epochs)
    for ev, es in zip(vec.epochs, seq.epochs):
        assert set(ev) - {"vectorized_k"} == set(es), ev["epoch"]
        for k, v in es.items():
            if k in TIMING:
                continue
            if isinstance(v, float) and not math.isfinite(v):
                assert not math.isfinite(ev[k]), k
            else:
                assert ev[k] == pytest.approx(v, rel=RTOL, abs=ATOL), (ev["epoch"], k)
    assert set(vec.final) - {"vectorized_k"} == set(seq.final)
    for k in ("status", "diverged_epoch", "target_epoch", "target_steps", "target_reached"):
        assert vec.final.get(k) == seq.final.get(k), k
    if seq.status == "completed":
        sv, ss = vec.model.state_dict(), seq.model.state_dict()
        for name in ss:
            assert _rel_err(sv[name], ss[name]) <= RTOL, name


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """Relative L2 error of a tensor (elementwise rtol is too strict for tiny entries)."""
    return float((a - b).norm() / b.norm().clamp_min(1e-12))


def _check(cfgs: list) -> list[TrainResult]:
    cfgs = [make_config(**c) for c in cfgs]
    td = get_data(cfgs[0], resolve_device(cfgs[0].device))
    vec = train_group(cfgs, td)
    for v, c in zip(vec, cfgs):
        _assert_same(v, train(c))
    return vec


def test_three_seeds_equal_sequential() -> None:
    vec = _check([dict(BASE, seed=s) for s in range(3)])
    assert all(e["vectorized_k"] == 3 for r in vec for e in r.epochs[1:])
    assert vec[0].epochs[-1]["train_loss"] != vec[1].epochs[-1]["train_loss"]  # really different


def test_learning_rates_and_inits_equal_sequential() -> None:
    _check([dict(BASE, lr=0.1), dict(BASE, lr=0.02, init="torch")])


def test_momentum_nesterov_weight_decay_equal_sequential() -> None:
    opt = dict(momentum=0.9, nesterov=True, weight_decay=1e-3)
    _check([dict(BASE, lr=0.05, seed=1, **opt), dict(BASE, lr=0.02, seed=2, **opt)])


def test_lr_schedules_and_batch_size_phases_equal_sequential() -> None:
    phases = [{"epochs": 1, "batch_size": 64}, {"epochs": 2, "batch_size": 16, "lr": 0.05}]
    _check([
        dict(BASE, schedule=phases, warmup_epochs=0.5, decay="cosine"),
        dict(BASE, schedule=phases, lr_multipliers={2: 3.0}, seed=4),
        dict(BASE, schedule=phases, decay="step", decay_epochs=[2], checkpoint_epochs=[0, 2]),
    ])


def test_mnist_784_inputs_equal_sequential() -> None:
    base = dict(dataset="mnist-5k", hidden=[64], max_train=1000, epochs=2, batch_size=64,
                lr=0.05)
    _check([dict(base, seed=0), dict(base, seed=1)])


def test_diverging_model_does_not_corrupt_the_others() -> None:
    vec = _check([dict(BASE, seed=0), dict(BASE, lr=1e15, seed=1), dict(BASE, lr=0.05)])
    assert [r.status for r in vec] == ["completed", "diverged", "completed"]
    assert len(vec[1].epochs) < len(vec[0].epochs)
    assert vec[0].epochs[-1]["vectorized_k"] == 2  # the diverged model left the stack


def test_target_stops_each_model_on_its_own() -> None:
    target = dict(target_metric="train_acc", target_value=0.5)
    vec = _check([dict(BASE, lr=0.2, **target), dict(BASE, lr=1e-4, **target)])
    assert vec[0].final["target_reached"] and not vec[1].final["target_reached"]
    assert len(vec[0].epochs) < len(vec[1].epochs)


def test_checkpoints_per_model() -> None:
    cfgs = [_cfg(seed=s, checkpoint_epochs=[0, 2]) for s in range(2)]
    vec = train_group(cfgs, get_data(cfgs[0], resolve_device("auto")))
    for v, c in zip(vec, cfgs):
        seq = train(c)
        for ep in (0, 2):
            for name, t in seq.checkpoint(ep).items():
                assert _rel_err(v.checkpoint(ep)[name], t) <= RTOL, (ep, name)


def test_stored_once_under_the_sequential_key(store_path) -> None:
    cfgs = [_cfg(seed=s, checkpoint_epochs=[1]) for s in range(3)]
    with Store(store_path) as st:
        res = train_many(cfgs + [cfgs[0]], store=st, label="vec")
        assert st.count() == 3
        assert res[3] is res[0]
        assert all(not r.cached and r.final["vectorized_k"] == 3 for r in res)
        for r, c in zip(res, cfgs):
            again = train(c, store=st)  # the sequential path finds the vectorized run
            assert again.cached and again.key == r.key and again.run_id == r.run_id
            assert [e["train_loss"] for e in again.epochs] == pytest.approx(
                [e["train_loss"] for e in r.epochs], rel=1e-12)
            torch.testing.assert_close(again.checkpoint(1), r.checkpoint(1))
        assert all(r.cached for r in train_many(cfgs, store=st))
        assert st.count() == 3


def test_run_local_vectorizes_eligible_groups(store_path) -> None:
    cfgs = [_cfg(seed=s) for s in range(2)]
    cfgs.append(_cfg(optimizer="adam", lr=0.01))  # not vectorizable
    with Store(store_path) as st:
        res = run_configs(cfgs, st, label="x")
    assert [r.config for r in res] == cfgs
    assert [r.final.get("vectorized_k") for r in res] == [2, 2, None]
    assert all(r.status == "completed" for r in res)


def test_stack_groups_follows_the_measured_rule() -> None:
    seeds = [_cfg(seed=s) for s in range(MAX_K + 1)]
    assert stack_groups(seeds) == [list(range(MAX_K)), [MAX_K]]
    big = [_cfg(seed=s, batch_size=MAX_VECTORIZED_BATCH * 2) for s in range(2)]
    assert stack_groups(big) == [[0], [1]]
    mixed = [
        _cfg(seed=0),
        _cfg(optimizer="adam"),
        _cfg(batchnorm=True),
        _cfg(seed=1, batch_size=16),  # another batch-size schedule
        _cfg(seed=2),
        _cfg(seed=3, engine="autograd"),
    ]
    assert stack_groups(mixed) == [[0, 4], [1], [2], [3], [5]]


def test_train_group_rejects_incompatible_configs() -> None:
    from batchlab.errors import BatchlabError

    cfgs = [_cfg(), _cfg(batch_size=16)]
    with pytest.raises(BatchlabError):
        train_group(cfgs, get_data(cfgs[0], resolve_device("auto")))


def test_a_group_is_deterministic() -> None:
    cfgs = [_cfg(seed=s, momentum=0.5) for s in range(3)]
    td = get_data(cfgs[0], resolve_device("auto"))
    a, b = train_group(cfgs, td), train_group(cfgs, td)
    for ra, rb in zip(a, b):
        assert [{k: v for k, v in e.items() if k not in TIMING} for e in ra.epochs] == [
            {k: v for k, v in e.items() if k not in TIMING} for e in rb.epochs]
        for pa, pb in zip(ra.model.parameters(), rb.model.parameters()):
            assert torch.equal(pa, pb)


# -- no silent fallback ---------------------------------------------------------------------------
def test_why_a_config_runs_alone_is_logged(caplog) -> None:
    big = MAX_VECTORIZED_BATCH * 2
    cfgs = [_cfg(seed=0, batch_size=big), _cfg(seed=1, batch_size=big),
            _cfg(optimizer="adam", lr=0.01), _cfg(seed=2, probes=["noise_scale"])]
    with caplog.at_level(logging.INFO, logger="batchlab.engine.vectorized"):
        assert stack_groups(cfgs) == [[0], [1], [2], [3]]
    text = caplog.text
    assert f"2 config(s) trained one by one, not vectorized: batch size {big} > MAX_VECTORIZED_BATCH" in text
    assert "optimizer adam runs on autograd" in text
    assert "probe noise_scale runs every few steps" in text


def test_a_group_that_cannot_stack_says_why_and_trains_one_by_one(caplog, monkeypatch) -> None:
    """Modules that are not batchlab's MLP cannot share a fused pass: logged, then each config
    is trained on its own (and equals train())."""
    from torch import nn

    from batchlab.engine import vectorized

    real = vectorized.build_model

    def not_an_mlp(cfg, data):
        return nn.Sequential(*real(cfg, data))  # the same layers in another class

    monkeypatch.setattr(vectorized, "build_model", not_an_mlp)
    cfgs = [_cfg(seed=s) for s in range(2)]
    with caplog.at_level(logging.WARNING, logger="batchlab.engine.vectorized"):
        res = train_group(cfgs, get_data(cfgs[0], resolve_device("auto")))
    assert "cannot share a vectorized pass (the model (Sequential) is not batchlab's MLP)" in caplog.text
    assert all("vectorized_k" not in r.final and r.status == "completed" for r in res)
    for r, c in zip(res, cfgs):
        _assert_same(r, train(c))


def _crash_stacked_steps(monkeypatch) -> list[int]:
    """Make every stacked (K > 1) fused step raise; K = 1 steps still work, so a silent
    one-by-one retry would turn the crash into completed runs."""
    from batchlab.engine.fused import FusedMLPSGD

    real, calls = FusedMLPSGD.step, []

    def step(self, x, y, lr, *a, **kw):
        if x.shape[0] > 1:
            calls.append(x.shape[0])
            raise RuntimeError("boom in the stacked step")
        return real(self, x, y, lr, *a, **kw)

    monkeypatch.setattr(FusedMLPSGD, "step", step)
    return calls


def test_a_crash_in_a_vectorized_pass_is_raised_and_stored(store_path, monkeypatch) -> None:
    calls = _crash_stacked_steps(monkeypatch)
    cfgs = [_cfg(seed=s) for s in range(2)]
    with Store(store_path) as st:
        with pytest.raises(RuntimeError, match="boom in the stacked step"):
            train_many(cfgs, store=st)
        recs = st.runs()
        assert len(recs) == 2 and calls == [2]  # one attempt, no retry
        assert all(r.status == "failed" and "boom in the stacked step" in r.error for r in recs)


def test_a_sweep_records_a_crashed_group_and_goes_on(store_path, monkeypatch) -> None:
    calls = _crash_stacked_steps(monkeypatch)
    cfgs = [_cfg(seed=s) for s in range(2)] + [_cfg(optimizer="adam", lr=0.01)]
    with Store(store_path) as st:
        res = run_configs(cfgs, st)
        assert [r.status for r in res] == ["failed", "failed", "completed"]
        assert all("RuntimeError: boom in the stacked step" in r.error for r in res[:2])
        assert calls == [2] and st.count() == 3
        assert {r.config_hash: r.status for r in st.runs()} == {r.key: r.status for r in res}
