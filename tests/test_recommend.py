"""`batchlab recommend` with user factories (good and bad), and the steps-to-target model it
rests on: the S_min/E_min fit and the handling of targets never reached."""

from __future__ import annotations

import json
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
                              "--epochs", "1", "--max-batch", "64", "--out", str(tmp_path / "rec")],
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
    assert out == ""
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
    # the McCandlish relation holds on the fitted curve
    for bs in (10.0, 250.0, 5000.0):
        s = stt.predicted_steps(fit, bs)
        assert (s / fit["s_min"] - 1) * (s * bs / fit["e_min"] - 1) == pytest.approx(1.0)


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
