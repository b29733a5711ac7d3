"""`batchlab recommend` with user factories (good and bad), and the steps-to-target model it
rests on: the S_min/E_min fit and the handling of targets never reached."""

from __future__ import annotations

import json
import math
import sys
import textwrap

import numpy as np
import pytest

from batchlab.config import make_config
from batchlab.experiments import steps_to_target as stt
from batchlab.runs.training import train

TINY = dict(dataset="digits", hidden=[32], epochs=2, batch_size=32, lr=0.1)  # trains in < 1 s

USER_MODULE = textwrap.dedent("""
    import torch
    from torch import nn
    from sklearn.datasets import load_digits

    def model():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))  # logits

    def data():
        d = load_digits()
        return torch.tensor(d.data, dtype=torch.float32) / 16, torch.tensor(d.target)

    def conv():
        return nn.Sequential(nn.Unflatten(1, (1, 8, 8)), nn.Conv2d(1, 4, 3), nn.ReLU(),
                             nn.Flatten(), nn.Linear(144, 10))

    def not_a_module():
        return "a string"

    def raises():
        raise ValueError("boom")

    def bad_shape():
        x, y = data()
        return x, y.reshape(-1, 1)

    def bad_labels():
        x, y = data()
        return x, y + 5

    def one_thing():
        return data()[0]

    def first_512():
        x, y = data()
        return x[:512], y[:512]

    def first_64():
        x, y = data()
        return x[:64], y[:64]
""")


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    (tmp_path / "bl_user_mod.py").write_text(USER_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("bl_user_mod", None)
    yield "bl_user_mod"
    sys.modules.pop("bl_user_mod", None)


def run_cli(args, monkeypatch, capsys) -> tuple[int, str, str]:
    from batchlab.cli import main

    monkeypatch.setattr(sys, "argv", ["batchlab", *args])
    code = 0
    try:
        main()
    except SystemExit as e:
        code = int(e.code or 0)
    cap = capsys.readouterr()
    return code, cap.out, cap.err


def test_recommend_user_factory_json(user_module, tmp_path, monkeypatch, capsys):
    code, out, err = run_cli(["recommend", "--model", f"{user_module}:conv", "--data",
                              f"{user_module}:data", "--epochs", "1", "--batch-size", "32", "--max-batch", "128",
                              "--no-lr-search", "--store", str(tmp_path / "s.db"),
                              "--json", "--out", str(tmp_path / "rec")], monkeypatch, capsys)
    assert code == 0, err
    rep = json.loads(out)  # exactly one JSON object on stdout
    for k in ("critical_batch_size", "recommended_batch_size", "recommended_lr", "noise_scale",
              "throughput", "evidence"):
        assert k in rep
    ns = rep["noise_scale"]
    assert ns["b_simple"] > 0 and len(ns["ci"]) == 2
    assert ns["final_point"]["method"] == "per-example (vmap)"  # a conv model: generic path
    sizes = [r["batch_size"] for r in rep["throughput"]]
    assert rep["recommended_batch_size"] in sizes
    assert all(r["samples_per_s"] > 0 for r in rep["throughput"] if r["status"] == "ok")
    assert rep["recommended_lr"] > 0
    assert (tmp_path / "rec" / "recommend.png").stat().st_size > 0


def test_recommend_builtin_mlp_on_user_data(user_module, tmp_path, monkeypatch, capsys):
    code, out, err = run_cli(["recommend", "--data", f"{user_module}:data", "--hidden", "32",
                              "--epochs", "1", "--max-batch", "64", "--no-lr-search",
                              "--store", str(tmp_path / "s.db"), "--out", str(tmp_path / "rec")],
                             monkeypatch, capsys)
    assert code == 0, err
    assert "batch size (time on this device)" in out


@pytest.mark.parametrize("args, message", [
    (["--model", "no_such_module_xyz:model"], "cannot import"),
    (["--model", "{m}:missing"], "has no attribute"),
    (["--model", "{m}:not_a_module"], "not a torch.nn.Module"),
    (["--model", "{m}:raises"], "ValueError: boom"),
    (["--model", "{m}:model", "--data", "{m}:bad_shape"], "1-d class labels"),
    (["--model", "{m}:model", "--data", "{m}:bad_labels"], "labels must lie in [0, 9]"),
    (["--model", "{m}:model", "--data", "{m}:one_thing"], "pair (X, y)"),
    (["--model", "{m}:conv", "--dataset", "digits", "--data", "{m}:data", "--hidden", "x"], "--hidden"),
    (["--model", "{m}:model"], "cannot take X"),  # 64-input model on 784-pixel MNIST-5k
])
def test_recommend_bad_user_code_is_one_line_exit_2(user_module, monkeypatch, capsys, args,
                                                      message):
    args = [a.format(m=user_module) for a in args]
    code, out, err = run_cli(["recommend", *args, "--json"], monkeypatch, capsys)
    assert code == 2
    assert json.loads(out)["code"] == 2  # --json: the error is the one object on stdout
    assert message in err
    assert len(err.strip().splitlines()) == 1


# -- the steps-to-target model ----------------------------------------------------------------
def test_fit_recovers_s_min_e_min_from_synthetic_points():
    s_min, e_min = 120.0, 30_000.0
    b = np.array([8, 16, 32, 64, 128, 256, 512, 1024, 4096], dtype=float)
    noise = np.exp(np.random.default_rng(0).normal(0, 0.03, b.size))
    fit = stt.fit_scaling(list(b), list((s_min + e_min / b) * noise))
    assert fit["s_min"] == pytest.approx(s_min, rel=0.1)
    assert fit["e_min"] == pytest.approx(e_min, rel=0.1)
    assert fit["b_crit"] == pytest.approx(e_min / s_min, rel=0.15)
    # the fitted curve predicts the true steps between, below and beyond the measured sizes
    for bs in (4.0, 100.0, 250.0, 2000.0, 8192.0):
        assert stt.predicted_steps(fit, bs) == pytest.approx(s_min + e_min / bs, rel=0.05)


def test_target_never_reached_reports_budget_and_best_value():
    cfg = make_config(**{**TINY, "epochs": 2, "probes": ["target_step"],
                         "target_metric": "test_acc", "target_value": 0.9999})
    res = train(cfg)
    o = stt.outcome(res)
    assert not o.reached and o.steps is None
    assert o.budget_steps == res.final["steps"] > 0
    assert 0 < o.best < 0.9999
    rows = [{"batch_size": 32, "lr": 0.1, "reached": False, "steps_to_target": None,
             "best_value": o.best, "budget_steps": o.budget_steps},
            {"batch_size": 32, "lr": 0.3, "reached": False, "steps_to_target": None,
             "best_value": o.best - 0.1, "budget_steps": o.budget_steps}]
    best = stt.best_per_batch(rows)
    assert best == [{"batch_size": 32, "lr": 0.1, "reached": False, "steps_to_target": None,
                     "examples_to_target": None, "best_value": o.best,
                     "budget_steps": o.budget_steps, "seeds": 1}]


# -- robustness: any data set the loader accepts gets a recommendation or a one-line reason ---
@pytest.mark.parametrize("args", [
    ["--data", "{m}:first_512", "--batch-size", "32", "--max-batch", "64", "--hidden", "16"],
    ["--model", "{m}:model", "--data", "{m}:first_64", "--batch-size", "16"],
])
def test_recommend_small_data_gets_a_recommendation(user_module, tmp_path, monkeypatch, capsys,
                                                    args):
    args = [a.format(m=user_module) for a in args]
    code, out, err = run_cli(["recommend", *args, "--epochs", "1", "--json", "--quiet",
                              "--store", str(tmp_path / "s.db"), "--out", str(tmp_path / "rec")],
                             monkeypatch, capsys)
    assert code == 0, err
    rep = json.loads(out)
    ok = [r["batch_size"] for r in rep["throughput"] if r["status"] == "ok"]
    assert rep["recommended_batch_size"] in ok
    assert rep["recommended_lr"] > 0 and rep["predicted_steps"] > 0
    assert rep["noise_scale"]["two_batch"]["method"].startswith("two-batch")


@pytest.mark.parametrize("args, message", [
    (["--epochs", "0"], "--epochs must be between 1"),
    (["--epochs", "-3"], "--epochs must be between 1"),
    (["--epochs", "1000000"], "--epochs must be between 1"),
    (["--seed", "-1"], "--seed"),
    (["--seed", str(2**70)], "--seed"),
    (["--lr", "nan"], "--lr"),
    (["--lr", "1e308"], "--lr"),
    (["--batch-size", "0"], "--batch-size"),
    (["--data", "{m}:first_64"], "exceeds the 58 training examples"),  # default batch 128
])
def test_recommend_refuses_bad_settings_in_one_line(user_module, tmp_path, monkeypatch, capsys,
                                                     args, message):
    args = [a.format(m=user_module) for a in args]
    store = tmp_path / "s.db"
    code, out, err = run_cli(["recommend", "--dataset", "digits", *args, "--json",
                              "--store", str(store), "--out", str(tmp_path / "rec")],
                             monkeypatch, capsys)
    assert code == 2, err
    assert json.loads(out)["code"] == 2  # --json: the error is the one object on stdout
    assert message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "rec").exists()  # refused before any work or output


def test_two_batch_sizes_are_valid_for_every_small_n():
    from batchlab.recommend.run import two_batch_sizes

    assert two_batch_sizes(3) is None
    for n in range(4, 5000):
        b_small, b_big = two_batch_sizes(n)
        assert b_small >= 1 and b_small < b_big <= max(2, n // 2) and b_big % b_small == 0
    assert two_batch_sizes(461) == (8, 128)  # 512 rows minus the 10% test set: the #14 crash
    assert two_batch_sizes(100_000) == (64, 1024)


# -- the decision math on synthetic inputs with known answers -----------------------------------
def _rows(sizes, sec):
    return [{"batch_size": b, "status": "ok", "seconds_per_step": sec(b)} for b in sizes]


def test_time_optimal_batch_is_the_closed_form_minimum():
    """s/step = a + b B and S(B) ~ 1 + B_crit/B give time ~ a + b B_crit + b B + a B_crit / B,
    minimal at B* = sqrt(a B_crit / b) (= 1000 here); 1024 is the best power of two."""
    from batchlab.recommend import decide

    a, b, b_crit = 1e-3, 1e-6, 1000.0
    sizes = [2**k for k in range(4, 14)]
    rec = decide(_rows(sizes, lambda B: a + b * B), b_crit=b_crit, s0=500, b0=128, base_lr=0.1)
    assert rec["recommended_batch_size"] == 1024
    s = 500 * (1 + b_crit / 1024) / (1 + b_crit / 128)  # anchored at the measured run
    assert rec["predicted_steps"] == pytest.approx(s)
    assert rec["predicted_seconds"] == pytest.approx(s * (a + b * 1024))
    assert rec["recommended_batch_size_compute"] == 64  # largest B <= 0.1 B_crit
    # lr: linear below B_crit, constant above (McCandlish eq. 2.7), through (128, 0.1)
    assert rec["recommended_lr"] == pytest.approx(0.1 * (1 + b_crit / 128) / (1 + b_crit / 1024))
    # a device whose step time does not grow with B: the largest batch wins
    flat = decide(_rows(sizes, lambda B: 1e-3), b_crit=b_crit, s0=500, b0=128, base_lr=0.1)
    assert flat["recommended_batch_size"] == sizes[-1]
    # a device that is purely linear in B (no fixed cost): the smallest batch wins
    lin = decide(_rows(sizes, lambda B: 1e-6 * B), b_crit=b_crit, s0=500, b0=128, base_lr=0.1)
    assert lin["recommended_batch_size"] == sizes[0]


def test_decide_skips_out_of_memory_sizes_and_refuses_nonsense():
    from batchlab.errors import BatchlabError
    from batchlab.recommend import decide

    rows = _rows([16, 32, 64], lambda B: 1.0) + [{"batch_size": 128, "status": "oom"}]
    assert decide(rows, b_crit=1e9, s0=10, b0=16, base_lr=0.1)["recommended_batch_size"] == 64
    with pytest.raises(BatchlabError, match="out of memory"):
        decide([{"batch_size": 16, "status": "oom"}], b_crit=10, s0=10, b0=16, base_lr=0.1)
    with pytest.raises(BatchlabError):
        decide(rows, b_crit=float("nan"), s0=10, b0=16, base_lr=0.1)


def test_lr_rule_and_critical_batch_choice():
    from batchlab.recommend import critical_batch, lr_rule_from_sweep, scale_lr

    def tuned(f):
        return [{"batch_size": b, "lr": f(b), "reached": True} for b in (32, 64, 128, 256)]

    assert lr_rule_from_sweep(tuned(lambda b: 0.01 * b), 1e4)[0] == "linear"
    assert lr_rule_from_sweep(tuned(lambda b: 0.01 * b**0.5), 1e4)[0] == "square-root"
    assert lr_rule_from_sweep(tuned(lambda b: 0.3), 1e4)[0] == "constant"
    assert scale_lr("linear", 0.1, 64, 256) == pytest.approx(0.4)
    assert scale_lr("square-root", 0.1, 64, 256) == pytest.approx(0.2)
    assert critical_batch({"b_crit": 300.0}, 50.0, 4096) == (300.0, "steps-to-target fit")
    assert critical_batch(None, 50.0, 4096)[0] == 50.0
    assert critical_batch(None, float("inf"), 4096)[0] == 4096  # noise dominates
    assert critical_batch({"b_crit": float("nan")}, None, 512)[0] == 512


def test_throughput_points_are_stored_and_not_remeasured(tmp_path, monkeypatch):
    import torch

    from batchlab.analysis import throughput as tput
    from batchlab.nn.models import build_mlp
    from batchlab.runs.store import Store

    x, y = torch.rand(256, 20), torch.randint(0, 3, (256,))
    model = build_mlp(20, [8], 3, seed=0)
    with Store(tmp_path / "s.db") as st:
        first = tput.measure_stored(model, x, y, [16, 32], st, min_seconds=0.01, max_steps=3)
        assert [r["cached"] for r in first] == [False, False]

        def boom(*a, **k):
            raise AssertionError("remeasured")

        monkeypatch.setattr(tput, "measure", boom)
        again = tput.measure_stored(build_mlp(20, [8], 3, seed=1), x, y, [16, 32], st)
        assert [r["cached"] for r in again] == [True, True]  # other weights, same shape
        assert [r["seconds_per_step"] for r in again] == [r["seconds_per_step"] for r in first]
        with pytest.raises(AssertionError, match="remeasured"):  # another shape is not reused
            tput.measure_stored(build_mlp(20, [9], 3, seed=0), x, y, [16], st)


def test_recommend_reports_progress_through_a_callback(tmp_path):
    import torch
    from sklearn.datasets import load_digits

    from batchlab.data.tensors import tensor_data
    from batchlab.nn.models import build_mlp
    from batchlab.recommend import recommend

    d = load_digits()
    x, y = torch.tensor(d.data[:300], dtype=torch.float32) / 16, torch.tensor(d.target[:300])
    td = tensor_data(x, y, 10, torch.device("cpu"))
    seen = []
    rep = recommend(build_mlp(64, [16], 10, seed=0), td, device=torch.device("cpu"),
                    base_batch=32, epochs=1, max_batch=64, progress=lambda *a: seen.append(a))
    stages = [s for s, _, _ in seen]
    assert stages[0] == "measurement run" and "throughput" in stages
    assert "lr search at batch 32" in stages
    assert ("measurement run", 1, 1) in seen and ("throughput", 3, 3) in seen  # 16, 32, 64
    assert rep["evidence"]["measurement_run"]["epochs"] == 1
    ls = rep["lr_search"]  # the best lr at batch 32 is a power-of-two multiple of 0.1, no slower
    assert ls["runs"][0]["steps_to_target"] == rep["evidence"]["measurement_run"]["steps"]
    assert math.log2(ls["lr"] / 0.1) == pytest.approx(round(math.log2(ls["lr"] / 0.1)))
    assert ls["steps"] <= ls["runs"][0]["steps_to_target"]
