"""Executors run a list of configs and stream finished results back to the one writer of the
store (this process). `local` runs them in order here; `ray` (optional extra) fans them out as
Ray tasks. Both skip runs already finished in the store, so sweeps resume."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from batchlab.config import TrainConfig
from batchlab.engine.result import TrainResult
from batchlab.errors import BatchlabError, ConfigError
from batchlab.runs.store import Store
from batchlab.runs.training import train_many


def run_configs(configs: Sequence[TrainConfig], store: Store, *, executor: str = "local",
                ray_address: str | None = None, label: str | None = None,
                console: Console | None = None, **ray_kw: Any) -> list[TrainResult]:
    if executor == "local":
        return run_local(configs, store, label=label, console=console)
    if executor == "ray":
        if any(c.data is not None or not c.builtin_model for c in configs):
            raise ConfigError("--executor ray runs the built-in models on built-in datasets; "
                              "use --executor local for a user's --model/--data")
        try:
            from batchlab.runs.ray_executor import run_ray
        except ImportError as e:
            raise BatchlabError(f"--executor ray needs Ray: pip install 'batchlab[ray]' ({e})") from None
        return run_ray(configs, store, address=ray_address, label=label, console=console, **ray_kw)
    raise ConfigError(f"unknown executor {executor!r}; use local or ray")


def run_local(configs: Sequence[TrainConfig], store: Store, *, label: str | None = None,
              console: Console | None = None) -> list[TrainResult]:
    """Train `configs` here, in order. Configs that can share a pass (seeds, lrs, inits on one
    batch-size schedule) are trained together when the measured rule says that is faster
    (`batchlab.engine.vectorized`). A run that crashes is stored as failed and the sweep goes
    on; bad input (`BatchlabError`) stops it."""
    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), console=console or Console(stderr=True),
                  transient=True) as prog:
        task = prog.add_task(label or "runs", total=len(configs))
        return train_many(configs, store, label=label, on_error="record",
                          on_done=lambda n: prog.advance(task, n))
