"""The lr at the reference batch size: a line search in factors of 2 from the given lr.

The measurement run reached a training loss L in S0 steps at (B0, lr0). An lr0 that is far from
the best one makes every later number about a badly tuned run: the steps anchor S0 and the lr
that the scaling rule carries to other batch sizes. So the search trains from the same initial
weights at 2 lr0, 4 lr0, ... (then lr0/2, ... if doubling did not help) until the steps to L
stop falling; each run stops at L (checked several times an epoch) or when it has used as many
steps as the best so far, so a search costs about as much as a few measurement runs at most.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from batchlab.analysis.scaling import outcome
from batchlab.config import make_config
from batchlab.probes.noise_scale import TargetStepProbe
from batchlab.runs.training import train

Progress = Callable[[str, "int | None", "int | None"], None]


def search_lr(init_model: nn.Module, td: Any, device: torch.device, *, b0: int, lr0: float,
              target_loss: float, seed: int, s0: int | None = None, budget_steps: int = 0,
              max_runs: int = 6, progress: Progress | None = None,
              stage: str = "lr search", fields: dict[str, Any] | None = None,
              loss: Any = None, n_train: int | None = None) -> dict[str, Any]:
    """{"lr", "steps", "runs"}: the lr (lr0 x 2^k) with the fewest steps to `target_loss` at
    batch b0. With `s0`, lr0 counts with s0 steps (the measurement run); without, lr0 is run
    first with a budget of `budget_steps`. "steps" is None if no lr reached the target.
    `fields`: further config fields of every run (optimizer, amp, loss: the measurement
    run's); `loss`: a loss object for `train`; `n_train`: the examples per epoch of a stream
    whose length is not declared."""
    steps_per_epoch = math.ceil((n_train or td.n_train) / b0)
    rows: dict[int, dict[str, Any]] = {}
    if s0 is not None:
        rows[0] = {"lr": lr0, "status": "completed", "reached": True, "steps_to_target": s0,
                   "source": "measurement run"}
    best = 0

    def run(k: int) -> bool:
        """Train at lr0 x 2^k; True if it beat the best so far (and becomes the best)."""
        nonlocal best
        cur = rows.get(best)
        budget = cur["steps_to_target"] if cur and cur["reached"] else budget_steps
        lr = lr0 * 2.0**k
        cfg = make_config(batch_size=b0, lr=lr, epochs=max(1, math.ceil(budget / steps_per_epoch)),
                          seed=seed, probes=[], target_metric="train_loss",
                          target_value=float(target_loss), device=str(device), **(fields or {}))
        res = train(cfg, model=copy.deepcopy(init_model), data=td, probes=[TargetStepProbe()],
                    loss=loss)
        o = outcome(res)
        rows[k] = {"lr": lr, "batch_size": b0, "status": res.status, "reached": o.reached,
                   "steps_to_target": o.steps, "source": stage}
        if progress:
            progress(stage, len(rows), max_runs + 1)
        better = o.reached and (cur is None or not cur["reached"]
                                or o.steps < cur["steps_to_target"])
        if better:
            best = k
        return better

    if progress:
        progress(stage, 0, max_runs + 1)
    if 0 not in rows:
        run(0)
    k = 1
    while len(rows) <= max_runs and run(k):
        k += 1
    if best == 0:
        k = -1
        while len(rows) <= max_runs and run(k):
            k -= 1
    return {"lr": rows[best]["lr"], "steps": rows[best]["steps_to_target"],
            "batch_size": b0, "runs": [rows[i] for i in sorted(rows)]}
