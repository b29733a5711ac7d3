"""`--plan`: what an experiment (or `reproduce`) will do and how long it will take, without
training anything.

How: each experiment declares its work (`Experiment.units` -> `work.Work`) and the plan costs
every unit by its kind, whichever experiment declared it: training runs (`runs`, and
`later_runs`, the worst case of runs chosen from earlier results), gradient-competition trials
(`plan_trials`, minus the chunks in the store when their checkpoints are stored), curvature
measurements; work an experiment times on the device itself is left out with its reason.
Configs already finished in the store are left out. Costs:

- A run that continues a prefix (`runs.continuation`: stored with its state, trained first in
  the same call, or kept by an earlier experiment of the plan) is charged only the epochs
  (steps, evaluations) after it; with Ray every run is charged whole.
- SGD steps: per run, epochs x ceil(n_train / batch size) per schedule phase; FLOPs 6 x
  parameters per training sample and 2 x parameters per evaluated sample (every epoch
  evaluates the training and test sets), trials 6 x parameters per sample-step.
- Time, from a short throughput timer on this device (`plan_timer`): seconds per SGD step of
  each distinct (model, batch size, K stacked runs) the plan trains, measured with the engine
  the run will use, plus what its step probes add per step; per run, its evaluations (the
  loop's own), its probes' start and epoch-end hooks, and its fixed cost (model, correct bits,
  store row and checkpoint files); seconds per gradient trial at each batch size (one thread,
  as trials run); for sharpness, seconds per Hessian-vector product and per real
  eps-sharpness maximisation on one thread, as its tasks run. Trials and curvature tasks run
  on the local executor's parallel workers (or the Ray cluster's CPUs), runs one after the
  other locally or spread over the cluster's CPUs with Ray.
- Peak memory: the resident data set plus K copies of the weights with optimizer state and
  one batch of activations; disk: the gradient tensors kept (float32).
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from batchlab.config import TrainConfig
from batchlab.engine.setup import get_data, resolve_device
from batchlab.engine.vectorized import stack_groups
from batchlab.experiments import get, prepared
from batchlab.experiments.base import Context
from batchlab.experiments.plan_timer import Timer, mlp_params
from batchlab.experiments.plan_trials import add_trials
from batchlab.experiments.work import Curvature
from batchlab.runs.continuation import continued_epochs

CURVATURE_HVPS = {"eps-sharpness": 12, "lambda-max": 40}  # per measurement, typical
K7_TYPICAL_LRS = 14  # sharpness's K7 sweep: 0.25 x 2 / lambda_max up to the first divergence


@dataclass
class ExperimentPlan:
    name: str
    runs: int = 0
    runs_stored: int = 0
    trials: int = 0
    trials_stored: int = 0
    curvature_hvps: int = 0
    sgd_steps: int = 0
    flops: float = 0.0
    peak_memory_bytes: int = 0
    tensor_disk_bytes: int = 0
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)


@dataclass
class Plan:
    device: str
    executor: str
    workers: int
    experiments: list[ExperimentPlan]
    probe_seconds: float
    cpu_load: float | None = None  # 1-minute load average when the timer started (None: unknown)

    def to_json(self) -> dict[str, Any]:
        tot = {k: sum(getattr(e, k) for e in self.experiments)
               for k in ("runs", "runs_stored", "trials", "trials_stored", "curvature_hvps",
                         "sgd_steps", "flops", "tensor_disk_bytes", "seconds")}
        return {
            "device": self.device, "executor": self.executor, "workers": self.workers,
            "projected_seconds": tot.pop("seconds"), "sgd_steps": tot.pop("sgd_steps"),
            "flops": tot.pop("flops"), **tot,
            "peak_memory_bytes": max((e.peak_memory_bytes for e in self.experiments), default=0),
            "probe_seconds": self.probe_seconds,
            "probe_rule": PROBE_RULE, "cpu_load": self.cpu_load, "cpus": os.cpu_count(),
            "experiments": [vars(e) for e in self.experiments],
        }

    def lines(self) -> list[str]:
        """The plan as plain text, one experiment a line, then the totals."""
        j = self.to_json()
        out = [f"plan on {self.device}, executor {self.executor} ({self.workers} worker(s)); "
               f"throughput timer {self.probe_seconds:.1f}s"]
        if self.cpu_load is not None and self.cpu_load > 0.5 * (os.cpu_count() or 1):
            out.append(f"  note: the CPU was busy (load {self.cpu_load:.1f} on {os.cpu_count()} "
                       f"cores); {PROBE_RULE}, so the projection leans to an idle machine")
        for e in self.experiments:
            out.append(
                f"  {e.name:<22} runs {e.runs:>4} (+{e.runs_stored} stored)  trials "
                f"{e.trials:>7} (+{e.trials_stored} stored)  steps {e.sgd_steps:>11,}  "
                f"{_h(e.flops)}FLOP  mem {_h(e.peak_memory_bytes)}B  disk "
                f"{_h(e.tensor_disk_bytes)}B  ~{_dur(e.seconds)}"
                + (f"  ({'; '.join(e.notes)})" if e.notes else ""))
        out.append(f"  total: {j['runs']} runs, {j['trials']} trials, {j['sgd_steps']:,} SGD "
                   f"steps, {_h(j['flops'])}FLOP, peak memory {_h(j['peak_memory_bytes'])}B, "
                   f"tensors {_h(j['tensor_disk_bytes'])}B on disk; projected "
                   f"{_dur(j['projected_seconds'])}")
        return out


PROBE_RULE = ("each timing keeps the fastest of 5 blocks, a block timed by min(wall time, CPU "
              "time per thread), and a multi-threaded timing is repeated on one thread, keeping "
              "the faster: another job on the CPU inflates neither the one-thread CPU time nor "
              "the minimum")


def cpu_load() -> float | None:
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):  # not on every platform
        return None


def make_plan(items: Sequence[tuple[str, Context]], probe_seconds: float = 0.15,
              on_experiment: Callable[[int, str], None] | None = None) -> Plan:
    """The plan of running each (experiment name, its context) in order; nothing is trained.
    `probe_seconds`: the least time each throughput timing runs. `on_experiment(i, name)` is
    called as the i-th experiment's planning starts (the CLI's progress line: timing a
    paper plan's shapes takes minutes on a CPU)."""
    first = items[0][1]
    device = resolve_device(first.device)
    workers = _workers(first, device)
    t0, load = time.perf_counter(), cpu_load()
    timer = Timer(device, threads=1 if first.executor == "ray" else torch.get_num_threads(),
                  min_seconds=probe_seconds)
    planned: set[str] = set()  # run keys an earlier experiment of this plan trains
    kept: list[TrainConfig] = []  # runs an earlier experiment trains keeping their state
    plans = []
    for i, (name, ctx) in enumerate(items):
        if on_experiment is not None:
            on_experiment(i, name)
        plans.append(_plan_one(name, prepared(name, ctx), timer, workers, planned, kept))
    return Plan(str(device), first.executor, workers, plans, time.perf_counter() - t0, load)


def print_plan(items: Sequence[tuple[str, Context]], as_json: bool = False,
               on_experiment: Callable[[int, str], None] | None = None) -> Plan:
    """Make the plan and print it on stdout: text, or one JSON object with `as_json`."""
    import sys

    from batchlab.atomic import to_json

    plan = make_plan(items, on_experiment=on_experiment)
    if as_json:
        sys.stdout.write(to_json(plan.to_json()) + "\n")
    else:
        sys.stdout.write("\n".join(plan.lines()) + "\n")
    return plan


def _workers(ctx: Context, device: torch.device) -> int:
    if ctx.executor == "ray":
        import ray

        from batchlab.runs.tasks import ensure_ray

        ensure_ray(ctx.ray_address, None)
        return max(1, int(ray.cluster_resources().get("CPU", 1)))
    from batchlab.analysis.gradcomp import default_workers

    return default_workers(device)


def _plan_one(name: str, ctx: Context, timer: Timer, workers: int,
              planned: set[str], kept: list[TrainConfig] | None = None) -> ExperimentPlan:
    plan = ExperimentPlan(name)
    work = get(name).units(ctx)
    plan.notes.extend(work.notes)
    if work.timed:
        plan.notes.append(work.timed)
        return plan
    if not (work.runs or work.later_runs or work.trials or work.curvature):
        plan.notes.append("no training runs")
    todo = _not_stored(work.runs + work.later_runs, ctx, plan, planned)
    if any(c.target_metric is not None for c in todo):
        plan.notes.append("runs with a target stop early: time is an upper bound")
    if ctx.executor == "local":  # Ray tasks train every run from scratch
        _add_runs(todo, plan, timer, 1, ctx.store, list(kept or []))
    else:
        _add_runs(todo, plan, timer, workers, continues=False)
    if kept is not None and work.keep_state:  # later experiments may continue these
        kept.extend(work.runs)
    if work.trials:
        add_trials(ctx, work.trials, plan, timer, workers)
    for unit in work.curvature:
        _add_curvature(unit, plan, timer)
    return plan


def _not_stored(configs: list[TrainConfig], ctx: Context, plan: ExperimentPlan,
                planned: set[str]) -> list[TrainConfig]:
    """The configs still to train: not in the store, not trained by an earlier experiment of
    the same plan (those count as stored), each once."""
    from batchlab.data import load_dataset

    todo, seen = [], set()
    for cfg in configs:
        key = cfg.key(load_dataset(cfg.dataset, cfg.data_dir).fingerprint)
        if key in seen:
            continue
        seen.add(key)
        if key in planned or (ctx.store is not None and ctx.store.finished(key) is not None):
            plan.runs_stored += 1
        else:
            from batchlab.engine.setup import check_batch_sizes

            check_batch_sizes(cfg, get_data(cfg, torch.device("cpu")))  # as the run refuses
            todo.append(cfg)
            planned.add(key)
    plan.runs = len(todo)
    return todo


def _phases(cfg: TrainConfig, skip: int = 0) -> list[tuple[int, int]]:
    """(epochs, batch size) per phase of a run, without its first `skip` epochs."""
    phases = ([(cfg.epochs, cfg.batch_size)] if not cfg.schedule else
              [(p.epochs, p.batch_size or cfg.batch_size) for p in cfg.schedule])
    out = []
    for epochs, b in phases:
        cut = min(skip, epochs)
        skip -= cut
        if epochs - cut:
            out.append((epochs - cut, b))
    return out


def _add_runs(todo: list[TrainConfig], plan: ExperimentPlan, timer: Timer, cpus: int,
              store: Any = None, kept: Sequence[TrainConfig] = (), continues: bool = True) -> None:
    seconds = 0.0
    # a run continuing a prefix (stored, trained first in the same call, or kept by an earlier
    # experiment of the plan: `runs.continuation`) trains only the epochs after it
    done = continued_epochs(todo, store, kept) if continues else {}
    for unit in stack_groups(todo):
        cfgs = [todo[i] for i in unit]
        cfg, k = cfgs[0], len(cfgs)
        td = get_data(cfg, torch.device("cpu"))
        dims = [td.input_dim, *cfg.hidden, td.n_classes]
        params = mlp_params(dims)
        n_eval = sum(len(y) for _, y in td.eval_sets.values())
        for i in unit:
            skip = done.get(i, 0)
            for epochs, b in _phases(todo[i], skip):
                steps = epochs * math.ceil(td.n_train / b)
                plan.sgd_steps += steps
                plan.flops += epochs * 6 * params * td.n_train
                seconds += steps * (timer.step_seconds(dims, b, k, cfg) / k
                                    + timer.step_probe_seconds(dims, b, cfg))
            # epoch 0 and every evaluated epoch (`eval_every`) not copied from a prefix
            evals = sum(todo[i].evaluates(e) for e in range(done.get(i, -1) + 1, todo[i].epochs + 1))
            plan.flops += evals * 2 * params * n_eval
            seconds += _run_overheads(todo[i], dims, evals, timer, skip)
        bmax = max(b for _, b in _phases(cfg))
        act = 4 * bmax * k * sum(dims) * 3
        plan.peak_memory_bytes = max(plan.peak_memory_bytes,
                                     td.x_train.numel() * 4 + 4 * k * params * 4 + act)
    plan.seconds += seconds / max(1, cpus)


def _run_overheads(cfg: TrainConfig, dims: list[int], evals: int, timer: Timer,
                   skip: int = 0) -> float:
    """Seconds one run of `cfg` spends besides its steps, each part timed (`plan_timer`): its
    evaluations, its probes' start and epoch-end hooks (every epoch), and its fixed cost
    (model, correct bits, the store row and its checkpoint files)."""
    epochs = sum(e for e, _ in _phases(cfg, skip))  # a continued run's epochs after its prefix
    start, per_epoch = timer.probe_epoch_seconds(dims, cfg)
    checkpoints = len({e for e in cfg.checkpoint_epochs if 0 <= e <= cfg.epochs})
    return (evals * timer.evaluation_seconds(dims, cfg) + start + epochs * per_epoch
            + timer.run_fixed_seconds(dims, cfg, checkpoints, epochs + 1))


def _add_curvature(c: Curvature, plan: ExperimentPlan, timer: Timer) -> None:
    """Curvature measurements per final model (not counting stored ones: each is keyed by the
    trained weights, unknown until the runs exist)."""
    from batchlab.experiments.sharpness import EPSILONS  # eps-sharpness's boxes
    from batchlab.experiments.sharpness_units import TRACE_TYPICAL_HVPS, TRACE_TYPICAL_RTOL

    # the trace stops at a stated accuracy (Hutch++, trace_rtol), so its products are not an
    # option: counted as the most it took on the measured models (TRACE_TYPICAL_HVPS at
    # TRACE_TYPICAL_RTOL), scaled by (that rtol / rtol)^2 for a tighter target (the residual
    # probes' count goes as 1 / rtol^2; a looser one costs no less: blocks set a floor);
    # the density's deflated block and timer steps add up to slq_steps, as before
    n_curv, slq = c.samples, c.slq_steps
    n_trace = math.ceil(TRACE_TYPICAL_HVPS * max(1.0, (TRACE_TYPICAL_RTOL / c.trace_rtol) ** 2))
    models = c.models
    if not models:
        return
    cfg = c.config
    td = get_data(cfg, torch.device("cpu"))
    dims = [td.input_dim, *cfg.hidden, td.n_classes]
    per_model = 4 * CURVATURE_HVPS["eps-sharpness"] + CURVATURE_HVPS["lambda-max"] + n_trace
    hvps = models * per_model + 2 * slq
    plan.curvature_hvps += hvps
    plan.flops += hvps * 12 * mlp_params(dims) * min(n_curv, td.n_train)
    n_eval = sum(len(y) for _, y in td.eval_sets.values())
    # seconds as the tasks run (one thread each, `default_workers` in parallel): the HVPs
    # timed, each eps-sharpness maximisation timed as a real call (not as HVPs), and the
    # interpolation per seed pair
    n = min(n_curv, td.n_train)
    t1 = timer.task_threads
    sharp = sum(timer.eps_sharpness_seconds(dims, n, dim) for dim in (None, c.subspace_dim))
    eps_hvps = models * 4 * CURVATURE_HVPS["eps-sharpness"]  # counted above, timed apart
    seconds = (models * len(EPSILONS) * sharp + (hvps - eps_hvps) * timer.hvp_seconds(dims, n, t1)
               + c.k7_seeds * c.points * n_eval
               * timer.eval_seconds_per_sample(dims, t1))
    # K7's lr sweep per seed: lambda_max at the initial weights, then full-batch GD steps
    n_k7 = min(c.k7_samples, td.n_train)
    gd = c.k7_seeds * K7_TYPICAL_LRS * c.k7_steps
    k7_hvps = c.k7_seeds * CURVATURE_HVPS["lambda-max"]
    plan.curvature_hvps += k7_hvps
    plan.flops += gd * 6 * mlp_params(dims) * n_k7
    seconds += gd * timer.gd_step_seconds(dims, n_k7) + k7_hvps * timer.hvp_seconds(dims, n_k7, t1)
    plan.seconds += seconds / _curvature_workers(c.config.device)


def _curvature_workers(device: str) -> int:
    """Curvature tasks in parallel: `sharpness_units.Batch.run`'s local worker threads."""
    from batchlab.analysis.gradcomp import default_workers

    return max(1, default_workers(resolve_device(device)))


def _h(x: float) -> str:
    for unit in ("", "K", "M", "G", "T", "P"):
        if abs(x) < 1000:
            return f"{x:.3g} {unit}"
        x /= 1000
    return f"{x:.3g} E"


def _dur(s: float) -> str:
    if s < 120:
        return f"{s:.0f}s"
    if s < 7200:
        return f"{s / 60:.1f} min"
    return f"{s / 3600:.1f} h"
