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
    from batchlab.experiments.plan_timer import Timer as PlanTimer

    cfg = make_config(**{"hidden": [8], **fields})
    probes = make_probes(cfg.probes)
    stepper = make_stepper([cfg], [build_mlp(4, [8], 3, batchnorm=cfg.batchnorm)], [probes])
    assert type(stepper) is {"fused": FusedStepper, "autograd": AutogradStepper}[kind]
    assert stepper.engine == kind
    assert (ineligible(cfg) is None) == (kind == "fused")
    assert PlanTimer(torch.device("cpu")).engine(cfg).kind == kind


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
def test_plan_timer_times_the_stepper_the_engine_builds(monkeypatch: pytest.MonkeyPatch,
                                                        fields: dict[str, Any],
                                                        kinds: list[str]) -> None:
    import batchlab.experiments.plan_timer as pp

    built: list[str] = []
    monkeypatch.setattr(pp, "make_stepper", _spy_fn(real=pp.make_stepper, into=built))
    cfg = make_config(hidden=[8], **fields)
    probe = pp.Timer(torch.device("cpu"), min_seconds=0.0)
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



# -- throughput points live in the checksummed measurements table ------------------------------
OLD_SCHEMA = """
CREATE TABLE throughput (key TEXT PRIMARY KEY, device TEXT NOT NULL, model_sig TEXT NOT NULL,
    batch_size INTEGER NOT NULL, engine TEXT NOT NULL, row_json TEXT NOT NULL,
    created_at REAL NOT NULL);
"""


def test_throughput_points_are_checksummed_measurements(tmp_path, monkeypatch) -> None:
    from batchlab.analysis import throughput as tput
    from batchlab.runs.measurements import Measurements
    from batchlab.runs.store import Store

    x, y = torch.rand(64, 6), torch.randint(0, 3, (64,))
    model = build_mlp(6, [8], 3, seed=0)
    with Store(tmp_path / "s.db") as st:
        first = tput.measure_stored(model, x, y, [8, 16], st, min_seconds=0.0, max_steps=2)
        assert [r["cached"] for r in first] == [False, False]
        meas = Measurements(st)
        assert meas.count(tput.KIND) == 2
        has_old = st.conn.execute("SELECT 1 FROM sqlite_master WHERE name = 'throughput'")
        assert has_old.fetchone() is None  # the legacy table is never created
        # a damaged row is not trusted: deleted and measured again
        st.conn.execute("UPDATE measurements SET payload_json = replace(payload_json, "
                        "'\"steps\":2', '\"steps\":9') WHERE kind = 'throughput'")
        st.conn.commit()
        again = tput.measure_stored(model, x, y, [8, 16], st, min_seconds=0.0, max_steps=2)
        assert [r["cached"] for r in again] == [False, False]
        assert all(r["steps"] == 2 for r in again)


def test_an_old_stores_throughput_points_are_kept_and_moved(tmp_path, monkeypatch) -> None:
    """A store written before the move keeps its points in its own `throughput` table, keyed
    by the sha256 of a JSON list: they are found (not re-timed), copied into `measurements`
    with a checksum, and left where they were."""
    import hashlib
    import json

    from batchlab.analysis import throughput as tput
    from batchlab.runs.measurements import Measurements
    from batchlab.runs.store import Store

    x = torch.rand(64, 6)
    y = torch.randint(0, 3, (64,))
    model = build_mlp(6, [8], 3, seed=0)
    dev = tput.device_signature(x.device)
    sig = tput.model_signature(model, (6,))
    rows = {bs: {"batch_size": bs, "engine": "fused", "status": "ok", "steps": 7,
                 "seconds_per_step": 0.125 * bs, "samples_per_s": 8.0,
                 "memory_method": tput.MEMORY_RSS, "peak_rss_mb": 1.5, "peak_memory_mb": 0.25}
            for bs in (8, 16)}
    with Store(tmp_path / "old.db") as st:
        st.ensure_schema(OLD_SCHEMA)
        for rep in (0, 3):
            for bs, row in rows.items():
                # the key as the old code wrote it
                parts = [dev, sig, bs, "fused", torch.__version__] + ([rep] if rep else [])
                key = hashlib.sha256(json.dumps(parts).encode()).hexdigest()
                assert key == tput.legacy_key(dev, sig, bs, "fused", rep)
                st.conn.execute("INSERT INTO throughput VALUES (?,?,?,?,?,?,?)",
                                (key, dev, sig, bs, "fused", json.dumps(row), 0.0))
        st.conn.commit()

    def boom(*a: Any, **k: Any) -> None:
        raise AssertionError("re-timed a stored point")

    monkeypatch.setattr(tput, "measure", boom)
    with Store(tmp_path / "old.db") as st:
        for rep in (0, 3):
            got = tput.measure_stored(model, x, y, [16, 8], st, replicate=rep)
            assert got == [{**rows[8], "cached": True}, {**rows[16], "cached": True}]
        assert Measurements(st).count(tput.KIND) == 4
        assert st.conn.execute("SELECT COUNT(*) FROM throughput").fetchone()[0] == 4
        st.conn.execute("DELETE FROM throughput")  # from now on the measurements rows answer
        st.conn.commit()
        got = tput.measure_stored(model, x, y, [8, 16], st, replicate=3)
        assert [r["steps"] for r in got] == [7, 7]
