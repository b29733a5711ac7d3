"""The cost of declared gradient-competition trials (`work.Trials`) in a plan, minus the
chunks of trials already in the store (looked up without changing anything)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import torch

from batchlab.analysis import gradcomp as gc
from batchlab.analysis.gradcomp_runner import KIND, device_id
from batchlab.analysis.gradcomp_trials import TrialRun, make_task
from batchlab.config import TrainConfig
from batchlab.data import load_dataset
from batchlab.engine.setup import build_model, get_data, resolve_device
from batchlab.errors import BatchlabError
from batchlab.experiments.base import Context
from batchlab.experiments.plan_timer import mlp_params
from batchlab.experiments.work import Trials
from batchlab.runs.measurements import (
    Measurements,
    spec_key,
    tensors_sha256,
    weights_sha256,
)


def add_trials(ctx: Context, units: Sequence[Trials], plan: Any, timer: Any,
               workers: int) -> None:
    """Add the declared trials to `plan` (an ExperimentPlan), minus the chunks in the store
    (looked up on the weights of their checkpoint runs when those are stored)."""
    if not units:
        return
    cfg = units[0].config
    device = resolve_device(cfg.device)
    td = get_data(cfg, torch.device("cpu"))
    dims = [td.input_dim, *cfg.hidden, td.n_classes]
    width = dims[-2] * dims[-1]
    fingerprint = load_dataset(cfg.dataset, cfg.data_dir).fingerprint
    states: dict[str, dict[int, torch.Tensor | None]] = {}  # checkpoint run key -> epoch -> state
    dev = torch.device("cpu") if ctx.executor == "ray" else device
    seconds = 0.0
    for u in units:
        state = None
        if u.checkpoint is not None:
            key = u.checkpoint.key(fingerprint)
            if key not in states:
                stored_run = ctx.store.finished(key) if ctx.store is not None else None
                states[key] = _stored_states(ctx, u.checkpoint, stored_run, sorted(
                    {v.epoch for v in units if v.checkpoint is not None
                     and v.checkpoint.key(fingerprint) == key}))
            state = states[key].get(u.epoch)
        run = u.run
        done = _stored_chunks(ctx, run, cfg, state, dev, td)
        for b in run.batch_sizes:
            todo = len(run.seeds) - done.get(b, 0)
            plan.trials += todo
            plan.trials_stored += done.get(b, 0)
            steps = run.steps(b)
            plan.sgd_steps += todo * steps
            plan.flops += todo * 6 * mlp_params(dims) * run.n_samples * (
                2 if "sum-loss" in run.modes and b > 1 else 1)
            seconds += todo * timer.trial_seconds(dims, b, run.n_samples, run.modes,
                                                  run.backend)
            if u.keep_tensors:
                plan.tensor_disk_bytes += todo * len(run.modes) * width * 4
    plan.seconds += seconds / max(1, workers)
    plan.peak_memory_bytes = max(plan.peak_memory_bytes,
                                 td.x_train.numel() * 4 + workers * 4 * mlp_params(dims) * 4)


def _stored_states(ctx: Context, cfg: TrainConfig, stored_run: Any, epochs: Sequence[int]
                   ) -> dict[int, dict[str, torch.Tensor]]:
    """Epoch -> the checkpoint's weights when the checkpoint run is stored (read, never
    trained)."""
    if stored_run is None:
        return {}
    plain = Context(preset=ctx.preset, seeds=ctx.seeds, data_dir=ctx.data_dir,
                    out_dir=ctx.out_dir, store=ctx.store, executor="local",
                    device=ctx.device, log_fn=ctx.log_fn, options=ctx.options)
    res = plain.run_many([cfg], label="checkpoints")[0]  # stored: fetched, not trained
    try:
        return {e: res.checkpoint(e) for e in epochs}
    except (KeyError, BatchlabError):
        # a checkpoint the stored run lacks, or a file that is missing, damaged or holds
        # NaN: the plan counts every trial of this seed as to do, and the real run says why
        return {}


def _stored_chunks(ctx: Context, run: TrialRun, cfg: Any, state: dict | None,
                   device: torch.device, td: Any) -> dict[int, int]:
    """Trials per b whose chunks are in the store (0 everywhere without the weights)."""
    if state is None or ctx.store is None:
        return {}
    model = build_model(cfg, td)
    try:
        gc.fit_state(model, state)
    except BatchlabError:  # weights of another shape or NaN: the real run refuses them
        return {}
    meas = Measurements(ctx.store)
    base = dict(weights=weights_sha256(model), data=tensors_sha256(td.x_train, td.y_train),
                device=device_id(device))
    out: dict[int, int] = {}
    for b in run.batch_sizes:
        chunks = run.chunks(b, device)
        first = make_task(run, b, *chunks[0], device, None)
        row = meas.store.conn.execute(
            "SELECT payload_json FROM measurements WHERE key = ?",
            (_key(first, base),)).fetchone()
        if row is None:
            continue
        scales = {m: float(v["values"]["scale"]) for m, v in json.loads(row[0])["modes"].items()}
        n = chunks[0][1] - chunks[0][0]
        for start, stop in chunks[1:]:
            if meas.has(KIND, make_task(run, b, start, stop, device, scales).spec(**base)):
                n += stop - start
        out[b] = n
    return out


def _key(task: Any, base: dict[str, str]) -> str:
    return spec_key(KIND, task.spec(**base))
