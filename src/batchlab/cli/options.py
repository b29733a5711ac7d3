"""Every option that more than one command takes, defined once (name, type, range, help).

Why one module: the same flag used to be declared per command, and the copies drifted (three
help texts for `--store`, `--dataset` a checked choice on `train` but any string on
`recommend`, `--seed` range-checked nowhere). tests/test_cli_options.py walks every command
and fails when one option name has two help texts or two types.

Choices come from the library's own tables (the registered dataset and optimizer names), so a
new entry there is a new choice here. Boolean flags get an empty metavar, so help shows
`--json`, not `--json <bool>`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal, Optional

import typer

from batchlab.config import INITS, MAX_SEED, optimizer_names
from batchlab.data import DATASETS

# typer reads choices from a Literal; these are built from the library's tables at import
Dataset = Literal[DATASETS]  # type: ignore[valid-type]
Optimizer = Literal[optimizer_names()]  # type: ignore[valid-type]  (batchlab.nn.registry)
Init = Literal[INITS]  # type: ignore[valid-type]
Executor = Literal["local", "ray"]
Amp = Literal["off", "bf16", "fp16"]
Preset = Literal["quick", "paper"]


def flag(*names: str, help: str) -> typer.models.OptionInfo:  # noqa: A002 (typer's word)
    """A boolean flag shown without a `<bool>` type column."""
    return typer.Option(*names, help=help, metavar="")


JsonOpt = Annotated[bool, flag("--json", help="Print one JSON object on stdout (what the command prints, as JSON).")]
QuietOpt = Annotated[bool, flag("--quiet", "-q", help="No progress or verdict lines on stderr.")]
StoreOpt = Annotated[Path, typer.Option("--store", help="SQLite results store: runs are stored there, reused and resumed (recommend keeps its throughput timings there too).")]
DataDirOpt = Annotated[Optional[str], typer.Option("--data-dir", help="Folder holding the four IDX files of mnist or fashion-mnist (default: the cache, else a download).")]
DeviceOpt = Annotated[str, typer.Option("--device", help="auto (cuda when available, else cpu), cpu, mps, cuda or cuda:N.")]
SeedOpt = Annotated[int, typer.Option("--seed", min=0, max=MAX_SEED, help="Seed of init, shuffles and estimators.")]
SeedsOpt = Annotated[int, typer.Option("--seeds", min=1, max=1000, help="Seeds per configuration (intervals over seeds).")]
DatasetOpt = Annotated[Dataset, typer.Option("--dataset", help="Built-in data set (--data replaces it).")]
ModelOpt = Annotated[Optional[str], typer.Option("--model", help="mlp (default), cnn, or module:factory returning your nn.Module.")]
DataOpt = Annotated[Optional[str], typer.Option("--data", help="module:loader returning (X, y) or (X_train, y_train, X_test, y_test); replaces --dataset.")]
LossOpt = Annotated[str, typer.Option("--loss", help="cross_entropy (classification), mse, next_token or module:factory returning a batchlab.task.Objective.")]
AmpOpt = Annotated[Amp, typer.Option("--amp", help="Mixed precision on the autograd engine: off, bf16 (CPU or GPU) or fp16 (GPU, with GradScaler).")]
OptimizerOpt = Annotated[Optimizer, typer.Option("--optimizer", help="A registered optimizer (recommend takes sgd, adam or adamw: its lr rule follows the optimizer).")]
BatchSizeOpt = Annotated[Optional[int], typer.Option("--batch-size", help="Examples per SGD step, >= 1 (recommend: of the measurement run; schedule-preset: the large batch).")]
MaxBatchOpt = Annotated[Optional[int], typer.Option("--max-batch", help="Largest batch size (recommend: to time; schedule-preset smith: to grow to).")]
LrOpt = Annotated[float, typer.Option("--lr", help="Base learning rate, > 0 (recommend: of the measurement run, where the lr search starts).")]
EpochsOpt = Annotated[Optional[int], typer.Option("--epochs", help="Passes over the training set (train: 0 evaluates the initial weights only; recommend: of the measurement run, default ~50k examples).")]
ConfigOpt = Annotated[Optional[Path], typer.Option("--config", help="TOML file of TrainConfig fields (train: flags given explicitly override it; schedule-preset: the small-batch config).")]
OutOpt = Annotated[Path, typer.Option("--out", help="Output folder (an experiment writes OUT/NAME/, recommend its figure and JSON).")]
ExecutorOpt = Annotated[Executor, typer.Option("--executor", help="Where runs execute: here, or on a Ray cluster (needs batchlab's ray extra).")]
RayOpt = Annotated[Optional[str], typer.Option("--ray-address", help="auto or HOST:PORT; none starts a local Ray.")]
LabelOpt = Annotated[Optional[str], typer.Option("--label", help="Just the runs stored under this label.")]
PresetOpt = Annotated[Preset, typer.Option("--preset", help="quick (CPU minutes) or paper (the study's settings).")]
PlanOpt = Annotated[bool, flag("--plan", help="Print what would run (minus what is stored): runs, trials, SGD steps, FLOPs, memory, disk and a projected time from a measured probe; trains nothing.")]
SetOpt = Annotated[Optional[list[str]], typer.Option("--set", help="Experiment option KEY=VALUE (repeatable; see `batchlab experiment options NAME`); reproduce sets KEY on every experiment that has it, NAME.KEY=VALUE on one.")]
