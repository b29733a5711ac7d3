"""`recommend --thorough`: a small steps-to-target sweep whose fit gives B_crit = E_min/S_min
and whose tuned lrs give the lr scaling rule (instead of the noise-scale estimate alone)."""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from batchlab.analysis.scaling import best_per_batch, fit_scaling, outcome
from batchlab.config import make_config
from batchlab.probes.noise_scale import TargetStepProbe
from batchlab.runs.training import train

Progress = Callable[[str, "int | None", "int | None"], None]


def small_sweep(init_model: nn.Module, td: Any, device: torch.device, b0: int, lr0: float,
                epochs: int, target: float | None, seed: int,
                progress: Progress | None = None, *, fields: dict[str, Any] | None = None,
                loss: Any = None, n_train: int | None = None,
                higher_is_better: bool = True) -> dict[str, Any]:
    """4 batch sizes x 3 lrs (centred on square-root scaling), target = the test metric the
    measurement run reached (accuracy for classification; `higher_is_better` says which way
    another metric goes), budget 2x its epochs. `fields` (optimizer, amp, loss) and `loss` (a
    loss object) are the measurement run's; `n_train` the length of an undeclared stream."""
    if target is None:
        return {"best": [], "fit": None, "note": "no test metric to target"}
    fields = dict(fields or {})
    metric = "test_metric" if fields.get("loss", "cross_entropy") != "cross_entropy" else "test_acc"
    n = n_train or td.n_train
    sizes = [b for b in (b0 // 4, b0, b0 * 4, b0 * 16) if 1 <= b <= n // 2]
    runs = []
    total = len(sizes) * 3
    if progress:
        progress("steps-to-target sweep", 0, total)
    for bs in sizes:
        for f in (1 / 3, 1.0, 3.0):
            lr = lr0 * math.sqrt(bs / b0) * f
            cfg = make_config(batch_size=bs, lr=lr, epochs=2 * epochs, seed=seed, probes=[],
                              target_metric=metric, target_value=float(target),
                              device=str(device), **fields)
            res = train(cfg, model=copy.deepcopy(init_model), data=td, probes=[TargetStepProbe()],
                        loss=loss)
            o = outcome(res)
            runs.append({"batch_size": bs, "lr": lr, "seed": seed, "status": res.status,
                         "reached": o.reached, "steps_to_target": o.steps,
                         "examples_to_target": o.examples, "best_value": o.best,
                         "budget_steps": o.budget_steps})
            if progress:
                progress("steps-to-target sweep", len(runs), total)
    best = best_per_batch(runs)
    reached = [r for r in best if r["reached"]]
    fit = None
    if len(reached) >= 2:
        fit = fit_scaling([r["batch_size"] for r in reached],
                          [r["steps_to_target"] for r in reached])
    op = ">=" if higher_is_better else "<="
    return {"target": f"{metric} {op} {target:.4g}", "runs": runs, "best": best, "fit": fit}
