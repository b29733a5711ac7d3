"""Schedule recipes produce the configs the papers prescribe, and those configs run."""

from __future__ import annotations

import math
import sys

import pytest

from batchlab.config import make_config
from batchlab.engine.recipes import apply_recipe, recipe_toml
from batchlab.errors import ConfigError
from batchlab.runs.sweep import tomllib
from batchlab.runs.training import train

TINY = dict(dataset="digits", hidden=[32], epochs=2, batch_size=32, lr=0.1)  # trains in < 1 s

BASE = {"dataset": "digits", "hidden": [32], "batch_size": 32, "lr": 0.1, "epochs": 8,
        "decay": "step", "decay_epochs": [4, 6], "decay_factor": 0.5}


def test_goyal_linear_scaling_and_warmup():
    f = apply_recipe("goyal", BASE, batch_size=256, warmup_epochs=2)
    assert f["batch_size"] == 256
    assert f["lr"] == pytest.approx(0.1 * 256 / 32)
    assert f["warmup_epochs"] == 2
    assert f["epochs"] == BASE["epochs"]  # equal epochs
    assert apply_recipe("linear-warmup", BASE, batch_size=256, warmup_epochs=2) == f


def test_smith_replaces_each_decay_by_a_batch_increase():
    f = apply_recipe("smith", BASE)
    assert f["decay"] == "none" and "decay_epochs" not in f
    assert f["schedule"] == [
        {"epochs": 4, "batch_size": 32, "lr": 0.1},
        {"epochs": 2, "batch_size": 64, "lr": 0.1},  # decay by 0.5 -> batch x 2
        {"epochs": 2, "batch_size": 128, "lr": 0.1},
    ]
    assert make_config(**f).epochs == BASE["epochs"]
    # capped by the training set: the remaining factor goes back into the lr
    capped = apply_recipe("smith", BASE, max_batch=100)
    assert capped["schedule"][2]["batch_size"] == 100
    assert capped["schedule"][2]["lr"] == pytest.approx(0.1 * 100 / 128)


def test_hoffer_regime_adaptation_sqrt_lr_and_ghost_bn():
    f = apply_recipe("hoffer", {**BASE, "batchnorm": True}, batch_size=128)
    r = 128 / 32
    assert f["epochs"] == BASE["epochs"] * r  # equal number of steps
    assert f["decay_epochs"] == [16, 24]
    assert f["lr"] == pytest.approx(0.1 * math.sqrt(r))
    assert f["ghost_batch_size"] == 32
    assert "ghost_batch_size" not in apply_recipe("hoffer", BASE, batch_size=128)


def test_bad_recipes_are_one_line_config_errors():
    with pytest.raises(ConfigError, match="unknown schedule recipe"):
        apply_recipe("nope", BASE)
    with pytest.raises(ConfigError, match="decay='step'"):
        apply_recipe("smith", {**BASE, "decay": "none"})


def test_toml_roundtrip_runs_with_the_batch_sizes_it_claims():
    f = apply_recipe("smith", {**BASE, "epochs": 3, "decay_epochs": [1, 2]})
    cfg = make_config(**tomllib.loads(recipe_toml(f)))
    res = train(cfg)
    assert [e["batch_size"] for e in res.epochs[1:]] == [32, 64, 128]
    assert all(e["lr"] == pytest.approx(0.1) for e in res.epochs[1:])
    sweep_base = tomllib.loads(recipe_toml(f, table="base"))["base"]
    assert make_config(**sweep_base) == cfg


def test_schedule_preset_command(tmp_path, monkeypatch, capsys):
    from batchlab.cli import main

    base = tmp_path / "base.toml"
    base.write_text(recipe_toml({**TINY, "epochs": 4}))
    monkeypatch.setattr(sys, "argv", ["batchlab", "schedule-preset", "hoffer", "--config",
                                      str(base), "--batch-size", "128"])
    main()
    cfg = make_config(**tomllib.loads(capsys.readouterr().out))
    assert (cfg.batch_size, cfg.epochs) == (128, 16)
    monkeypatch.setattr(sys, "argv", ["batchlab", "schedule-preset", "goyal"])
    with pytest.raises(SystemExit) as e:
        main()
    assert e.value.code == 2
    assert "needs --batch-size" in capsys.readouterr().err


@pytest.mark.parametrize("args, needle", [
    (["goyal", "--batch-size", "256", "--warmup-epochs", "inf"], "warmup-epochs"),
    (["goyal", "--batch-size", "256", "--base-batch", "0"], "base-batch"),
    (["smith", "--max-batch", "-5"], "max-batch"),
    (["goyal", "--batch-size", "256", "--table", "[x]"], "--table"),
])
def test_hostile_preset_options_are_one_line_errors(run_main, capsys, args: list[str], needle: str) -> None:
    assert run_main("schedule-preset", *args) == 2
    err = capsys.readouterr().err
    assert needle in err and err.count("\n") == 1
