"""What `--plan` charges a run and sharpness's curvature for (`experiments.plan`,
`experiments.plan_timer`): each part of the work is timed by running its own code, and the plan
multiplies each timing by how often the run does it. The timer is replaced by a fixed count
here (no timed unit tests); the projection's accuracy is measured in
results/quick-preset/plan-accuracy.md."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch

import batchlab.experiments.plan as P
import batchlab.experiments.plan_timer as pp
from batchlab.config import make_config
from batchlab.engine.setup import get_data
from batchlab.experiments import Context, prepared
from batchlab.probes.base import PROBES
from batchlab.probes.base import Probe as TrainProbe

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def one_second(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """`seconds_per_call` runs the timed code once and says it took one second."""
    ran: list[Any] = []

    def fake(fn: Any, device: torch.device, min_seconds: float, max_reps: int = 200,
             warmup: int = 2, blocks: int = 5) -> float:
        ran.append(fn())
        return 1.0

    monkeypatch.setattr(pp, "seconds_per_call", fake)
    return ran


class Cycling(TrainProbe):
    """A step probe called every 2nd step that measures on every 3rd call (as `steplengths`
    measures on every 5th): its cost is one cycle of 3 calls per 6 steps."""

    name = "plan-cycling"
    every_steps = 2
    record_every = 3
    needs_grad = True
    seen: list[tuple[int, bool]] = []
    hooks: list[str] = []

    def on_start(self, ctx: Any) -> dict[str, float]:
        Cycling.hooks.append("start")
        return {}

    def on_step(self, ctx: Any, step: int, xb: torch.Tensor, yb: torch.Tensor) -> None:
        grads = [p.grad for p in ctx.model.parameters()]
        Cycling.seen.append((step, all(g is not None for g in grads)))

    def on_epoch_end(self, ctx: Any, epoch: int) -> dict[str, float]:
        Cycling.hooks.append("epoch")
        return {}


@pytest.fixture
def cycling(monkeypatch: pytest.MonkeyPatch) -> type[Cycling]:
    monkeypatch.setitem(PROBES, Cycling.name, Cycling)
    Cycling.seen, Cycling.hooks = [], []
    return Cycling


def test_step_probes_are_timed_on_their_cadence_after_a_real_step(one_second, cycling) -> None:
    probe = pp.Timer(torch.device("cpu"))
    cfg = make_config(hidden=[8], probes=[cycling.name])
    dims = [784, 8, 10]
    # one timed cycle (1 s) of record_every calls, one call every every_steps steps
    assert probe.step_probe_seconds(dims, 16, cfg) == pytest.approx(1 / (3 * 2))
    assert cycling.seen == [(2, True), (4, True), (6, True)]  # the gradients of a real step
    cycling.hooks.clear()
    assert probe.probe_epoch_seconds(dims, cfg) == (1.0, 1.0)
    assert cycling.hooks == ["start", "epoch"]
    assert probe.step_probe_seconds(dims, 16, make_config(hidden=[8], probes=[])) == 0.0


class Costs:
    """Every timing a constant, each a different power of ten, so the total shows which parts
    were charged how often."""

    task_threads = 1

    def __init__(self) -> None:
        self.fixed: list[tuple[int, int]] = []
        self.hvp_threads: list[int | None] = []
        self.sharp: list[tuple[int, int | None]] = []

    def step_seconds(self, dims: Any, b: int, k: int, cfg: Any, n_threads: Any = None
                     ) -> float:
        return 1.0

    def step_probe_seconds(self, dims: Any, b: int, cfg: Any) -> float:
        return 10.0 if "steplengths" in cfg.probes else 0.0

    def probe_epoch_seconds(self, dims: Any, cfg: Any) -> tuple[float, float]:
        return 100.0, 1000.0

    def evaluation_seconds(self, dims: Any, cfg: Any) -> float:
        return 1e4

    def run_fixed_seconds(self, dims: Any, cfg: Any, checkpoints: int, rows: int) -> float:
        self.fixed.append((checkpoints, rows))
        return 1e5

    def hvp_seconds(self, dims: Any, n: int, n_threads: int | None = None) -> float:
        self.hvp_threads.append(n_threads)
        return 1.0

    def eps_sharpness_seconds(self, dims: Any, n: int, subspace_dim: int | None) -> float:
        self.sharp.append((n, subspace_dim))
        return 1000.0

    def eval_seconds_per_sample(self, dims: Any, n_threads: int | None = None) -> float:
        return 0.0

    def gd_step_seconds(self, dims: Any, n: int) -> float:
        return 0.0


@pytest.mark.parametrize("probes", [["geometry"], ["geometry", "steplengths"]])
def test_a_run_is_charged_its_steps_probes_evaluations_and_fixed_cost(probes) -> None:
    cfg = make_config(hidden=[8], batch_size=64, epochs=2, probes=probes, checkpoint_epochs=[2])
    steps = 2 * math.ceil(get_data(cfg, torch.device("cpu")).n_train / 64)
    plan, costs = P.ExperimentPlan("x"), Costs()
    P._add_runs([cfg], plan, costs, 1)  # type: ignore[arg-type]
    per_step = 1.0 + (10.0 if "steplengths" in probes else 0.0)
    evals = cfg.evaluated_epochs()  # epoch 0 and both epochs
    assert plan.seconds == pytest.approx(steps * per_step + evals * 1e4 + 100 + 2 * 1000 + 1e5)
    assert costs.fixed == [(1, 3)]  # one checkpoint file, three epoch rows


def test_curvature_is_charged_per_measured_operation_on_task_threads(tmp_path, monkeypatch
                                                                     ) -> None:
    from batchlab.experiments import get

    monkeypatch.setattr(P, "_curvature_workers", lambda device: 2)
    ctx = prepared("sharpness", Context(preset="quick", seeds=2, out_dir=tmp_path))
    o = ctx.opts
    unit = get("sharpness").units(ctx).curvature[0]  # as declared: 6 final models
    plan, costs = P.ExperimentPlan("sharpness", runs=6), Costs()
    P._add_curvature(unit, plan, costs)  # type: ignore[arg-type]
    # every eps-sharpness is one timed real maximisation (full space and the subspace, at each
    # eps), not a count of HVPs; every other product at the HVP time of one task thread
    eps_hvps = 6 * 4 * P.CURVATURE_HVPS["eps-sharpness"]
    other = plan.curvature_hvps - eps_hvps  # lambda_max, trace, density, K7's lambda_max
    assert plan.seconds == pytest.approx((6 * 2 * 2 * 1000.0 + other * 1.0) / 2)
    assert set(costs.sharp) == {(o.curvature_samples, None), (o.curvature_samples, o.subspace_dim)}
    assert set(costs.hvp_threads) == {1}


def test_evaluation_is_timed_with_autograd_on_and_scaled_to_the_sets(one_second, monkeypatch
                                                                      ) -> None:
    import batchlab.measure.metrics as M

    grad_on: list[bool] = []
    real = M.eval_metrics

    def spy(model: Any, data: Any, objective: Any = None) -> Any:
        grad_on.append(torch.is_grad_enabled())
        return real(model, data, objective)

    monkeypatch.setattr(M, "eval_metrics", spy)
    monkeypatch.setattr(pp, "EVAL_SAMPLES", 100)
    cfg = make_config(hidden=[8])
    sets = get_data(cfg, torch.device("cpu")).eval_sets
    full = sum(len(y) for _, y in sets.values())
    got = pp.Timer(torch.device("cpu")).evaluation_seconds([784, 8, 10], cfg)
    assert got == pytest.approx(full / (100 * len(sets)))  # 1 s for 100 samples of each set
    assert grad_on == [True]  # the loop evaluates without no_grad


def test_a_runs_fixed_cost_saves_it_to_a_store_with_its_checkpoints(one_second, monkeypatch
                                                                     ) -> None:
    import batchlab.runs.training as T

    saved: list[tuple[int, int, str]] = []
    real = T.save_result

    def spy(store: Any, result: Any, label: Any, t0: Any = None) -> None:
        real(store, result, label, t0)
        saved.append((len(result.checkpoints), len(result.epochs),
                      store.finished(result.key).status))

    monkeypatch.setattr(T, "save_result", spy)
    cfg = make_config(hidden=[8])
    assert pp.Timer(torch.device("cpu")).run_fixed_seconds([784, 8, 10], cfg, 2, 5) == 1.0
    assert saved == [(2, 5, "completed")]


def test_a_multithreaded_timing_is_checked_on_one_thread() -> None:
    # a busy core inflates a parallel op's time (its threads wait for the descheduled one) but
    # not one thread's CPU time: the probe keeps the smaller of the two
    from batchlab.experiments.plan_timer import Timer

    seen: list[int] = []

    def fake() -> float:
        seen.append(torch.get_num_threads())
        return 5.0 if torch.get_num_threads() > 1 else 1.0

    assert Timer(torch.device("cpu"), threads=2)._memo_get(("x",), fake) == 1.0
    assert seen == [2, 1]
    seen.clear()
    assert Timer(torch.device("cpu"), threads=1)._memo_get(("x",), fake) == 1.0
    assert seen == [1]  # one thread: timed once
