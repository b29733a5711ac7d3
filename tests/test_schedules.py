"""Schedules: piecewise batch size/lr, lr multipliers, warmup, decay, scaling rules — as pure
functions and as they act inside a real (tiny) training run."""

from __future__ import annotations

import math

import pytest

from batchlab.config import Phase, make_config
from batchlab.engine import schedules
from batchlab.errors import ConfigError
from batchlab.runs.store import Store
from batchlab.runs.training import train

TINY = dict(dataset="digits", hidden=[16], lr=0.01, probes=[])
N_TRAIN = 1437  # digits: 1797 images, 360 held out for test


def test_epoch_settings_switch_exactly_at_the_phase_boundary():
    cfg = make_config(schedule=[{"epochs": 3, "batch_size": 1024},
                                {"epochs": 2, "batch_size": 64, "lr": 0.1}], lr=0.01)
    settings = schedules.epoch_settings(cfg)
    assert cfg.epochs == 5
    assert [p.epoch for p in settings] == [1, 2, 3, 4, 5]
    assert [p.batch_size for p in settings] == [1024, 1024, 1024, 64, 64]
    assert [p.base_lr for p in settings] == [0.01, 0.01, 0.01, 0.1, 0.1]


def test_settings_without_schedule_and_with_zero_epochs():
    assert [p.batch_size for p in schedules.epoch_settings(make_config(batch_size=32, epochs=2))] \
        == [32, 32]
    assert schedules.epoch_settings(make_config(epochs=0)) == []


def test_switch_in_a_run_changes_steps_per_epoch_at_epoch_k():
    cfg = make_config(**TINY, batch_size=100,
                      schedule=[Phase(epochs=2, batch_size=100), Phase(epochs=2, batch_size=500)])
    res = train(cfg)
    rows = res.epochs[1:]
    assert [r["batch_size"] for r in rows] == [100, 100, 500, 500]
    steps = [0] + [r["steps"] for r in rows]
    per_epoch = [b - a for a, b in zip(steps, steps[1:])]
    assert per_epoch == [math.ceil(N_TRAIN / 100)] * 2 + [math.ceil(N_TRAIN / 500)] * 2
    assert [r["samples"] for r in rows] == [N_TRAIN * k for k in (1, 2, 3, 4)]


def test_scheduled_run_is_one_stored_run_with_one_curve(tmp_path):
    cfg = make_config(**TINY, schedule=[Phase(epochs=1, batch_size=400),
                                        Phase(epochs=2, batch_size=50)])
    with Store(tmp_path / "s.db") as st:
        res = train(cfg, store=st, label="sched")
        again = train(cfg, store=st, label="sched")
        runs = st.runs(label="sched")
    assert len(runs) == 1 and again.cached
    assert [e["epoch"] for e in again.epochs] == [0, 1, 2, 3]
    assert [e.get("batch_size") for e in res.epochs] == [None, 400, 50, 50]


def test_lr_multipliers_apply_from_their_epoch_and_accumulate():
    cfg = make_config(**TINY, batch_size=500, epochs=4, lr_multipliers={2: 10.0, 4: 0.5})
    assert [schedules.multiplier(cfg, e) for e in (1, 2, 3, 4)] == [1.0, 10.0, 10.0, 5.0]
    lrs = [r["lr"] for r in train(cfg).epochs[1:]]
    assert lrs == pytest.approx([0.01, 0.1, 0.1, 0.05])


def test_warmup_is_linear_then_flat():
    cfg = make_config(epochs=10, warmup_epochs=2.0)
    assert schedules.warmup_decay(cfg, 0.5) == pytest.approx(0.25)
    assert schedules.warmup_decay(cfg, 1.0) == pytest.approx(0.5)
    assert schedules.warmup_decay(cfg, 2.0) == 1.0
    assert schedules.warmup_decay(cfg, 7.0) == 1.0
    # per step inside an epoch: step 5 of 10 in epoch 1 is t = 0.5
    first = schedules.epoch_settings(cfg)[0]
    assert schedules.lr_at(cfg, first, 5, 10) == pytest.approx(0.01 * 0.25)
    assert not schedules.constant_within_epoch(cfg)


def test_warmup_acts_per_step_in_training():
    cfg = make_config(**TINY, batch_size=500, epochs=2, warmup_epochs=1.0)
    rows = train(cfg).epochs[1:]
    n = math.ceil(N_TRAIN / 500)
    # the row records the lr of the epoch's last step
    assert rows[0]["lr"] == pytest.approx(0.01 * (n - 1) / n)
    assert rows[1]["lr"] == pytest.approx(0.01)


def test_cosine_decay_values():
    cfg = make_config(epochs=10, decay="cosine")
    assert schedules.warmup_decay(cfg, 0.0) == pytest.approx(1.0)
    assert schedules.warmup_decay(cfg, 5.0) == pytest.approx(0.5)
    assert schedules.warmup_decay(cfg, 10.0) == pytest.approx(0.0, abs=1e-12)
    assert schedules.warmup_decay(cfg, 2.5) == pytest.approx(0.5 * (1 + math.cos(math.pi / 4)))
    # after a warmup the cosine spans the remaining epochs
    wc = make_config(epochs=10, decay="cosine", warmup_epochs=2.0)
    assert schedules.warmup_decay(wc, 1.0) == pytest.approx(0.5)
    assert schedules.warmup_decay(wc, 6.0) == pytest.approx(0.5)


def test_step_decay_values_and_constant_within_epoch():
    cfg = make_config(epochs=10, decay="step", decay_epochs=[3, 6], decay_factor=0.1)
    assert schedules.warmup_decay(cfg, 2.99) == 1.0
    assert schedules.warmup_decay(cfg, 3.0) == pytest.approx(0.1)
    assert schedules.warmup_decay(cfg, 6.0) == pytest.approx(0.01)
    assert schedules.constant_within_epoch(cfg)
    with pytest.raises(ConfigError):
        make_config(decay="step")


def test_scaling_rules():
    assert schedules.linear_scaling(0.01, 64, 1024) == pytest.approx(0.16)
    assert schedules.sqrt_scaling(0.01, 64, 1024) == pytest.approx(0.04)
    assert schedules.linear_scaling(0.1, 256, 256) == pytest.approx(0.1)
    assert schedules.sqrt_scaling(0.1, 256, 64) == pytest.approx(0.05)


def test_bad_schedules_are_config_errors():
    with pytest.raises(ConfigError):
        make_config(schedule=[{"epochs": 0, "batch_size": 64}])
    with pytest.raises(ConfigError):
        make_config(lr_multipliers={0: 10.0})
    with pytest.raises(ConfigError):
        make_config(lr_multipliers={3: -1.0})


def test_arms_sharing_the_baselines_first_epochs_continue_one_run_of_them(tmp_path):
    """Smith's arm follows the baseline's batch size and lr until the first lr decay: the
    experiment trains those epochs once per seed and both arms continue that run; the other
    arms (another batch size from the start) are trained from scratch."""
    from batchlab.experiments import Context, get, prepared, run_experiment

    opts = {"dataset": "digits", "hidden": [16], "epochs": 3, "decay_epochs": [2],
            "gbn": False, "large_batch": 256}
    with Store(tmp_path / "s.db") as st:
        ctx = Context(preset="quick", seeds=2, out_dir=tmp_path / "out", store=st, options=opts)
        work = get("schedules").units(prepared("schedules", ctx))
        names = work.state["names"]
        heads = [c for n, c in zip(names, work.runs) if n is None]
        assert [(c.epochs, c.seed) for c in heads] == [(2, 0), (2, 1)]
        run_experiment("schedules", ctx)
        by = {(r.seed, r.config["batch_size"], r.config["epochs"], r.config["decay"],
               bool(r.config["schedule"])): r for r in st.runs()}
    base = 128  # options.Schedules.base_batch
    for seed in (0, 1):
        head = by[seed, base, 2, "none", False].run_id
        assert by[seed, base, 3, "step", False].env.get("continued_from") == head  # small
        assert by[seed, base, 3, "none", True].env.get("continued_from") == head  # smith
        assert "continued_from" not in by[seed, 256, 3, "step", False].env  # large (or goyal)
