"""One engine decision: `choose_engine` names the engine of a run, and every place that asks
(the loop's stepper factory, the vectorization planner, the throughput measurements, the
`--plan` probe) gets the same answer."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

from batchlab.config import make_config
from batchlab.engine import steppers
from batchlab.engine.choice import EngineChoice, choose_engine
from batchlab.engine.steppers import AutogradStepper, FusedStepper, make_stepper
from batchlab.engine.vectorized import ineligible
from batchlab.errors import ConfigError
from batchlab.nn.models import MLP, build_mlp
from batchlab.probes import make_probes

# (config fields, expected kind, a word of the reason)
TABLE: list[tuple[dict[str, Any], str, str]] = [
    ({}, "fused", "plain SGD"),
    ({"momentum": 0.9}, "fused", "momentum SGD"),
    ({"momentum": 0.9, "nesterov": True, "weight_decay": 1e-4}, "fused", "momentum SGD"),
    ({"engine": "fused"}, "fused", "plain SGD"),
    ({"engine": "autograd"}, "autograd", "engine='autograd'"),
    ({"optimizer": "adam"}, "autograd", "optimizer adam"),
    ({"optimizer": "lars", "momentum": 0.9}, "autograd", "optimizer lars"),
    ({"model": "cnn"}, "autograd", "model cnn"),
    ({"batchnorm": True}, "autograd", "batchnorm"),
    ({"discard_fraction": 0.1}, "autograd", "discard_fraction"),
    ({"loss": "mse"}, "autograd", "loss mse"),
    ({"amp": "bf16"}, "autograd", "amp"),
    ({"probes": ["steplengths"]}, "autograd", "probe steplengths needs gradients"),
    ({"probes": ["geometry"]}, "fused", "plain SGD"),
    ({"optimizer": "adam", "engine": "autograd"}, "autograd", "optimizer adam"),
]


@pytest.mark.parametrize(("fields", "kind", "why"), TABLE)
def test_choose_engine_table(fields: dict[str, Any], kind: str, why: str) -> None:
    cfg = make_config(**fields)
    choice = choose_engine(cfg, make_probes(cfg.probes))
    assert isinstance(choice, EngineChoice)
    assert choice.kind == kind and choice.fused == (kind == "fused")
    assert why in choice.reason and str(choice).startswith(f"{kind}: ")


@pytest.mark.parametrize("fields", [{"optimizer": "adam"}, {"batchnorm": True},
                                    {"discard_fraction": 0.1}, {"loss": "mse"},
                                    {"probes": ["steplengths"]}, {"model": "cnn"}])
def test_explicit_fused_it_cannot_do_is_a_one_line_config_error(fields: dict[str, Any]) -> None:
    cfg = make_config(**fields, engine="fused")
    with pytest.raises(ConfigError, match="engine='fused' needs") as e:
        choose_engine(cfg, make_probes(cfg.probes))
    assert "\n" not in str(e.value)


def test_the_module_decides_when_there_is_one() -> None:
    cfg = make_config(hidden=[8])
    assert choose_engine(cfg, model=build_mlp(4, [8], 3)).fused
    # a user's MLP with batchnorm layers: the fused backward has none, so autograd
    bn = MLP(4, [8], 3, batchnorm=True)
    assert choose_engine(cfg, model=bn).reason == "batchnorm runs on autograd"
    other = nn.Sequential(nn.Linear(4, 3), nn.LogSoftmax(-1))
    assert "is not batchlab's MLP" in choose_engine(cfg, model=other).reason
    assert choose_engine(cfg, streamed=True).reason == "streamed data runs on autograd"
    assert choose_engine(cfg, loss_object=True).reason == "a loss object runs on autograd"


@pytest.mark.parametrize(("fields", "kind", "why"), [r for r in TABLE if "cnn" not in str(r[0])])
def test_every_asker_gets_the_same_answer(fields: dict[str, Any], kind: str, why: str) -> None:
    """The stepper factory builds the class of the kind; the vectorization planner stacks
    exactly the fused configs (none of these has a probe that runs every few steps); the plan
    probe reads the same kind."""
    from batchlab.experiments.plan_probe import Probe as PlanProbe

    cfg = make_config(**{"hidden": [8], **fields})
    probes = make_probes(cfg.probes)
    stepper = make_stepper([cfg], [build_mlp(4, [8], 3, batchnorm=cfg.batchnorm)], [probes])
    assert type(stepper) is {"fused": FusedStepper, "autograd": AutogradStepper}[kind]
    assert stepper.engine == kind
    assert (ineligible(cfg) is None) == (kind == "fused")
    assert PlanProbe(torch.device("cpu")).engine(cfg).kind == kind


def _spy_fn(*, real: Any, into: list[str]) -> Any:
    """The stepper factory, recording the engine of each stepper it builds."""
    def spy(*a: Any, **kw: Any) -> steppers.Stepper:
        s = real(*a, **kw)
        into.append(s.engine)
        return s

    return spy


def _spy(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    built: list[str] = []
    monkeypatch.setattr(steppers, "make_stepper", _spy_fn(real=steppers.make_stepper, into=built))
    return built


@pytest.mark.parametrize(("optimizer", "amp", "kind"), [("sgd", "off", "fused"),
                                                        ("adam", "off", "autograd"),
                                                        ("sgd", "bf16", "autograd")])
def test_throughput_times_the_stepper_the_engine_builds(monkeypatch: pytest.MonkeyPatch,
                                                        optimizer: str, amp: str,
                                                        kind: str) -> None:
    from batchlab.analysis import throughput as tput

    built = _spy(monkeypatch)
    model = build_mlp(6, [8], 3, seed=0)
    x, y = torch.rand(64, 6), torch.randint(0, 3, (64,))
    rows = tput.measure(model, x, y, [8, 16], min_seconds=0.0, max_steps=3, warmup=1,
                        optimizer=optimizer, amp=amp)
    expected = choose_engine(tput.timing_config(optimizer, amp), model=model).kind
    assert expected == kind and built == [kind, kind]
    assert [r["engine"].split("+")[0] for r in rows] == [kind, kind]
    assert all(r["status"] == "ok" for r in rows)
    # a Python loss object keeps the step on autograd, with that loss
    built.clear()
    from batchlab.task import Classification

    tput.measure(model, x, y, [8], min_seconds=0.0, max_steps=2, warmup=0,
                 objective=Classification())
    assert built == ["autograd"]


@pytest.mark.parametrize(("fields", "kinds"), [({}, ["fused"]),
                                               ({"optimizer": "adam"}, ["autograd"]),
                                               ({"probes": ["steplengths"]}, ["autograd"])])
def test_plan_probe_times_the_stepper_the_engine_builds(monkeypatch: pytest.MonkeyPatch,
                                                        fields: dict[str, Any],
                                                        kinds: list[str]) -> None:
    import batchlab.experiments.plan_probe as pp

    built: list[str] = []
    monkeypatch.setattr(pp, "make_stepper", _spy_fn(real=pp.make_stepper, into=built))
    cfg = make_config(hidden=[8], **fields)
    probe = pp.Probe(torch.device("cpu"), min_seconds=0.0)
    assert probe.step_seconds([6, 8, 3], 4, 1, cfg) > 0
    assert built == kinds == [choose_engine(cfg, make_probes(cfg.probes)).kind]
    built.clear()
    probe.step_seconds([6, 8, 3], 4, 1, cfg)  # memoized: not timed again
    assert built == []
    probe.gd_step_seconds([6, 8, 3], 16)  # sharpness's full-batch GD steps: autograd
    assert built == ["autograd"]
    if kinds == ["fused"]:  # K stacked runs: one fused stepper over all of them
        built.clear()
        probe.step_seconds([6, 8, 3], 4, 3, cfg)
        assert built == ["fused"]

