"""The work an experiment declares before any of it runs (`Experiment.units`), and the results
it gets back (`Experiment.analyze`).

Why a declaration: `--plan` costs an experiment from what it declares, without running any of
it and without knowing which experiment it is; `Experiment.run` executes the same declaration.
Work whose configuration depends on earlier results (which lr survives a halving round, the
trained weights a curvature measurement or a gradient-competition trial starts from) is
declared up front by its kind and size - its worst case where its size depends on the results
(`later_runs`) - and carried out by `analyze` from the same declaration.

Unit kinds and what the planner needs of each:

- `runs`: training configs, trained (or fetched from the store) by `Experiment.run` before
  `analyze` is called; `Results.runs` holds them in the same order.
- `later_runs`: training configs `analyze` may train once it has seen earlier results; the
  planner counts every one (an upper bound: the real run may stop early).
- `trials`: gradient-competition trial runs (`Trials`), each on the weights a checkpoint run
  of `runs` saves (or the user's checkpoint file).
- `curvature`: curvature measurements on the final models of `runs` (`Curvature`).
- `timed`: non-empty when the experiment times work on the device itself (its result is the
  timing, so a projection of it means nothing): why the planner leaves it out.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from batchlab.config import TrainConfig
from batchlab.engine.result import TrainResult


@dataclass
class Trials:
    """Gradient-competition trials of one replicate in one regime: `run` (an
    `analysis.gradcomp_trials.TrialRun`: seeds, batch sizes, modes) on the weights that
    `checkpoint` (a config of the experiment's `runs`) saves after epoch `epoch`; `checkpoint`
    None: the user's checkpoint file. `config` names the model and data the trials run on;
    `keep_tensors`: the gradient tensors are kept on disk."""

    replicate: int | str
    regime: str
    run: Any
    config: TrainConfig
    checkpoint: TrainConfig | None
    epoch: int
    keep_tensors: bool = False


@dataclass
class Curvature:
    """Curvature measurements on `models` final models of `config`'s shape (trained by the
    experiment's `runs`), each on the first `samples` training examples: eps-sharpness and
    lambda_max by their typical Hessian-vector-product counts, a Hutch++ trace to
    `trace_rtol` relative accuracy; two SLQ densities of `slq_steps`; a 1-D interpolation evaluated at
    `points` points; and per `k7_seeds` seed, lambda_max at the initial weights and an lr sweep
    of full-batch GD (`k7_steps` steps per lr on `k7_samples` examples)."""

    config: TrainConfig
    models: int
    samples: int
    trace_rtol: float
    slq_steps: int
    points: int
    k7_samples: int
    k7_steps: int
    k7_seeds: int
    subspace_dim: int  # of the eps-sharpness in a random subspace


@dataclass
class Work:
    """Everything an experiment needs done (see the module docstring for each kind). `label`
    names its runs in the store and the progress bar; `state` carries what `units` worked out
    and `analyze` reads back (names of the runs' groups, the grid), so it is worked out once."""

    label: str
    runs: list[TrainConfig] = field(default_factory=list)
    later_runs: list[TrainConfig] = field(default_factory=list)
    keep_state: bool = False  # the runs keep their end state for longer runs to continue
    trials: list[Trials] = field(default_factory=list)
    curvature: list[Curvature] = field(default_factory=list)
    timed: str = ""
    notes: list[str] = field(default_factory=list)
    state: dict[str, Any] = field(default_factory=dict)


@dataclass
class Results:
    """What `analyze` gets: the declared work and the results of its `runs`, in order."""

    work: Work
    runs: list[TrainResult] = field(default_factory=list)

    @property
    def state(self) -> dict[str, Any]:
        return self.work.state
