"""The evaluation budget: `eval_every` (long runs evaluated every k epochs) and
`train_eval_size` (train metrics on a fixed stratified subset). Both only change what is
measured, never the trajectory, and both stay out of the key at their defaults."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import TINY

from batchlab import train
from batchlab.config import make_config
from batchlab.engine.setup import get_data
from batchlab.errors import ConfigError

pytestmark = pytest.mark.usefixtures("one_thread")

LONG = {**TINY, "epochs": 7}


def test_eval_every_skips_metrics_but_not_the_trajectory() -> None:
    every = train(make_config(**LONG))
    sparse = train(make_config(**LONG, eval_every=3, checkpoint_epochs=[5]))
    assert [e["epoch"] for e in sparse.epochs] == list(range(8))  # a row per epoch still
    scored = [e["epoch"] for e in sparse.epochs if "test_acc" in e]
    assert scored == [0, 3, 5, 6, 7]  # every 3rd, the checkpoint (and plateau start), the last
    for a, b in zip(every.epochs, sparse.epochs):
        # the same steps: running loss and weights-only probes every epoch, bit-identical
        assert a.get("running_loss") == b.get("running_loss") and a["dist_init_w"] == b["dist_init_w"]
        if "test_acc" in b:
            assert (a["train_acc"], a["test_acc"]) == (b["train_acc"], b["test_acc"])
        else:
            assert b["gap"] is None and "train_loss" not in b
    assert sparse.final["test_acc"] == every.final["test_acc"]
    assert sparse.final["test_correct_bits"] == every.final["test_correct_bits"]


def test_eval_every_counts_its_evaluations_and_refuses_a_target() -> None:
    cfg = make_config(**LONG, eval_every=3)
    # every 3rd, the last, and the start of the last fifth (7 - round(7/5) = 6)
    assert [e for e in range(8) if cfg.evaluates(e)] == [0, 3, 6, 7]
    assert cfg.evaluated_epochs() == 4 and make_config(**LONG).evaluated_epochs() == 8
    cfg = make_config(**{**LONG, "epochs": 24}, eval_every=5)
    assert [e for e in range(25) if cfg.evaluates(e)] == [0, 5, 10, 15, 19, 20, 24]
    with pytest.raises(ConfigError, match="eval_every must be 1"):
        make_config(**LONG, eval_every=2, target_metric="test_acc", target_value=0.9)
    with pytest.raises(ConfigError):
        make_config(**LONG, eval_every=0)


def test_defaults_stay_out_of_the_key() -> None:
    base = make_config(**TINY)
    assert make_config(**TINY, eval_every=1, train_eval_size=None).key("x") == base.key("x")
    assert make_config(**TINY, eval_every=2).key("x") != base.key("x")
    assert make_config(**TINY, train_eval_size=500).key("x") != base.key("x")


def test_train_eval_size_scores_a_stratified_subset_and_trains_on_all() -> None:
    full_cfg = make_config(**TINY)
    sub_cfg = make_config(**TINY, train_eval_size=500)
    full = get_data(full_cfg, torch.device("cpu"))
    sub = get_data(sub_cfg, torch.device("cpu"))
    assert sub.n_train == full.n_train == 1437
    xs, ys = sub.eval_sets["train"]
    assert len(ys) == 500 and torch.equal(sub.eval_sets["test"][1], full.eval_sets["test"][1])
    counts = np.bincount(ys.numpy(), minlength=10)
    share = np.bincount(full.y_train.numpy(), minlength=10) / full.n_train
    assert np.abs(counts - 500 * share).max() <= 1  # stratified, not the first rows
    # the subset's rows are training rows
    rows = {tuple(r) for r in full.x_train.numpy().round(4).tolist()}
    assert all(tuple(r) in rows for r in xs.numpy().round(4).tolist()[:50])

    a, b = train(full_cfg), train(sub_cfg)
    assert [e.get("running_loss") for e in a.epochs] == [e.get("running_loss") for e in b.epochs]
    assert a.final["test_acc"] == b.final["test_acc"]
    # the train accuracy is measured on the subset: a multiple of 1/500
    assert b.final["train_acc"] * 500 == pytest.approx(round(b.final["train_acc"] * 500), abs=1e-3)
    assert a.final["train_acc"] * 1437 == pytest.approx(round(a.final["train_acc"] * 1437), abs=1e-3)


def test_train_eval_size_zero_scores_no_train_metric_and_changes_nothing_else() -> None:
    """0: the train set is not evaluated (steps-to-target's grid on a test target); the
    trajectory, the test metrics and the target's step are those of the run that scores it."""
    target = {"target_metric": "test_acc", "target_value": 0.8, "probes": ["target_step"]}
    scored = train(make_config(**TINY, **target))
    bare = train(make_config(**TINY, **target, train_eval_size=0))
    assert "train" not in get_data(make_config(**TINY, train_eval_size=0),
                                   torch.device("cpu")).eval_sets
    assert not any(k.startswith(("train_loss", "train_acc")) for e in bare.epochs for k in e)
    assert all(e["gap"] is None for e in bare.epochs)
    assert [e.get("running_loss") for e in scored.epochs] == [e.get("running_loss") for e in bare.epochs]
    assert [e.get("test_acc") for e in scored.epochs] == [e.get("test_acc") for e in bare.epochs]
    assert (scored.final["target_step"], scored.final["test_correct_bits"]) == \
        (bare.final["target_step"], bare.final["test_correct_bits"])
    assert make_config(**TINY, train_eval_size=0).key("x") != make_config(**TINY).key("x")


def test_steps_to_target_scores_the_train_set_only_for_a_train_target(tmp_path) -> None:
    from batchlab.experiments import Context, prepared
    from batchlab.experiments.steps_to_target import one_config

    for metric, size in (("test_acc", 0), ("train_loss", None)):
        ctx = prepared("steps-to-target", Context(preset="quick", seeds=1, out_dir=tmp_path,
                                                  options={"target_metric": metric}))
        assert one_config(ctx, ctx.opts, 64, 0.1, 0, 2).train_eval_size == size


def test_the_convergence_gate_spans_the_same_epochs_whatever_the_evaluation() -> None:
    """plateau_gain counts the last fifth in epochs: a run evaluated every k epochs gives the
    number the every-epoch run gives (the gate's verdicts cannot move with eval_every)."""
    from batchlab.experiments.schedules_exp import plateau_gain

    every = train(make_config(**{**TINY, "epochs": 9}))
    sparse = train(make_config(**{**TINY, "epochs": 9}, eval_every=4))
    assert plateau_gain(sparse.epochs) == plateau_gain(every.epochs) is not None
    rows = [{"epoch": e, "train_acc": a} for e, a in [(0, .1), (1, .5), (2, .6), (3, .7), (4, .8),
                                                       (5, .9), (6, .91), (7, .92), (8, .93),
                                                       (9, .94), (10, .95)]]
    assert plateau_gain(rows) == pytest.approx(0.95 - 0.93)  # epochs 8 -> 10
    assert plateau_gain(rows[:2]) is None  # one epoch: nothing to compare
