"""Experiments: each one a module here with an `EXPERIMENT` object, run by
`batchlab experiment NAME` and collected by `batchlab reproduce`.

Data flows one way: the experiment builds configs -> `ctx.run_many` trains them through the
store (resumable, local or Ray) -> the experiment turns stored metrics into tables, figures and
claims -> `write_outputs` puts `results.csv`, `summary.md`, `claims.json` and PNGs in
`OUT/NAME/` -> `report.py` assembles `report.html`.

Verdicts are computed from measurements by the rules in `verdicts.py`, never written by hand.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console

from batchlab.config import TrainConfig, make_config
from batchlab.engine.result import TrainResult
from batchlab.errors import ConfigError
from batchlab.runs.store import Store

# name -> module under batchlab.experiments (imported lazily); order = report order
REGISTRY: dict[str, str] = {
    "batch-size": "batch_size",
    "learning-rate": "learning_rate",
    "switch": "switch",
    "distance": "distance",
    "adam-vs-sgd": "adam_vs_sgd",
    "gradient-competition": "gradient_competition",
    "sharpness": "sharpness",
    "step-lengths": "step_lengths",
    "large-batch-fixes": "large_batch_fixes",
    "steps-to-target": "steps_to_target",
    "throughput": "throughput",
    "schedules": "schedules_exp",
}
PRESETS = ("quick", "paper")


@dataclass
class Claim:
    id: str
    claim: str
    verdict: str  # reproduced | not_reproduced | inconclusive
    evidence: dict[str, Any]
    rule: str = ""

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "claim": self.claim, "verdict": self.verdict,
                "evidence": self.evidence, "rule": self.rule}


@dataclass
class Output:
    """What an experiment produces. `figures` maps file names to matplotlib Figures."""

    rows: list[dict[str, Any]] = field(default_factory=list)
    summary: str = ""
    claims: list[Claim] = field(default_factory=list)
    figures: dict[str, Any] = field(default_factory=dict)
    extra_files: dict[str, str] = field(default_factory=dict)


@dataclass
class Context:
    """Everything an experiment may use: preset, seeds, data location, store, executor."""

    preset: str = "quick"
    seeds: int = 1
    data_dir: str | None = None
    out_dir: Path = Path("out")
    store: Store | None = None
    executor: str = "local"
    ray_address: str | None = None
    device: str = "auto"
    console: Console = field(default_factory=lambda: Console(stderr=True))
    options: dict[str, Any] = field(default_factory=dict)

    @property
    def paper(self) -> bool:
        return self.preset == "paper"

    @property
    def seed_list(self) -> list[int]:
        return list(range(self.seeds))

    def dataset_fields(self) -> dict[str, Any]:
        """The quick preset trains on the embedded mnist-5k unless a --data-dir is given;
        the paper preset uses MNIST (downloaded, or from --data-dir)."""
        if self.data_dir is not None or self.paper:
            return {"dataset": "mnist", "data_dir": self.data_dir}
        return {"dataset": "mnist-5k"}

    def config(self, **fields: Any) -> TrainConfig:
        return make_config(**{**self.dataset_fields(), "device": self.device, **fields})

    def run_many(self, configs: Sequence[TrainConfig], label: str) -> list[TrainResult]:
        """Train (or fetch from the store) every config; results in the same order."""
        from batchlab.runs.executors import run_configs

        if self.store is None:
            raise ConfigError("experiments need a results store")
        return run_configs(list(configs), self.store, executor=self.executor,
                           ray_address=self.ray_address, label=label, console=self.console)

    def out(self, name: str) -> Path:
        d = self.out_dir / name
        d.mkdir(parents=True, exist_ok=True)
        return d


@dataclass
class Experiment:
    name: str
    title: str
    run: Callable[[Context], Output]
    description: str = ""


def get(name: str) -> Experiment:
    if name not in REGISTRY:
        raise ConfigError(f"unknown experiment {name!r}; choose one of {', '.join(available())}")
    try:
        mod = importlib.import_module(f"batchlab.experiments.{REGISTRY[name]}")
    except ModuleNotFoundError as e:
        if e.name == f"batchlab.experiments.{REGISTRY[name]}":
            raise ConfigError(f"experiment {name!r} is not available in this version") from None
        raise
    return mod.EXPERIMENT


def available() -> list[str]:
    """Registered experiments whose module exists in this install."""
    import importlib.util

    return [n for n, m in REGISTRY.items()
            if importlib.util.find_spec(f"batchlab.experiments.{m}") is not None]


def run_experiment(name: str, ctx: Context) -> tuple[Output, Path]:
    """Run one experiment and write its outputs to `ctx.out_dir/name`."""
    from batchlab.experiments.outputs import write_outputs

    if ctx.preset not in PRESETS:
        raise ConfigError(f"unknown preset {ctx.preset!r}; use quick or paper")
    if ctx.seeds < 1:
        raise ConfigError("--seeds must be at least 1")
    exp = get(name)
    output = exp.run(ctx)
    path = write_outputs(exp, output, ctx.out(name))
    return output, path
