"""The optimizer registry is open: one registration makes a name a valid config, a CLI choice's
equal and a buildable optimizer; an unknown name is one line."""

from __future__ import annotations

import typing
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from conftest import TINY

from batchlab.config import make_config, optimizer_names
from batchlab.errors import ConfigError
from batchlab.nn.registry import OPTIMIZERS, register_optimizer, unregister_optimizer

NAME = "test-rmsprop"


@pytest.fixture
def rmsprop() -> Iterator[list[int]]:
    """A test optimizer, registered for one test; `calls` counts its builds."""
    calls: list[int] = []

    def build(cfg: Any, groups: list[dict[str, Any]]) -> torch.optim.Optimizer:
        calls.append(1)
        return torch.optim.RMSprop(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)

    register_optimizer(NAME, build)
    try:
        yield calls
    finally:
        unregister_optimizer(NAME)


def test_a_registered_optimizer_is_a_valid_config_and_trains(rmsprop: list[int]) -> None:
    from batchlab.runs.training import train

    cfg = make_config(**{**TINY, "epochs": 1}, optimizer=NAME)
    res = train(cfg)
    assert res.status == "completed" and rmsprop == [1]
    assert res.final["train_loss"] < 3.0  # it stepped: a NaN or a divergence fails


def test_unregistering_makes_the_name_unknown_again(rmsprop: list[int]) -> None:
    unregister_optimizer(NAME)
    assert NAME not in optimizer_names() and NAME not in OPTIMIZERS
    with pytest.raises(ConfigError, match="unknown optimizer"):
        make_config(optimizer=NAME)


def test_an_unknown_optimizer_is_one_line_naming_the_registered_ones() -> None:
    with pytest.raises(ConfigError) as e:
        make_config(optimizer="rmsprop")
    msg = str(e.value)
    assert "\n" not in msg and "unknown optimizer 'rmsprop'" in msg
    assert all(n in msg for n in ("sgd", "adam", "adamw", "lars", "cblr", "mclr"))


def test_every_registered_name_has_a_builder_and_the_cli_offers_them_all() -> None:
    import batchlab.nn.optim  # noqa: F401  (registers the built-ins)
    from batchlab.cli import options

    assert set(optimizer_names()) == set(OPTIMIZERS)
    assert typing.get_args(options.Optimizer) == optimizer_names()


def test_cli_refuses_an_unknown_optimizer_with_exit_2(run_main: Any,
                                                      capsys: pytest.CaptureFixture) -> None:
    assert run_main("train", "--optimizer", "rmsprop", "--dataset", "digits") == 2
    err = capsys.readouterr().err
    assert "rmsprop" in err and len(err.strip().splitlines()) == 1


def test_a_bad_name_or_builder_is_refused() -> None:
    with pytest.raises(ConfigError):
        register_optimizer("has space", lambda cfg, groups: None)  # type: ignore[arg-type,return-value]
    with pytest.raises(TypeError):
        register_optimizer("fine", "not callable")  # type: ignore[arg-type]
    assert "fine" not in optimizer_names() and "has space" not in optimizer_names()
