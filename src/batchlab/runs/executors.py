"""Executors run a list of configs and stream finished results back to the one writer of the
store (this process). `local` runs them in order here; `ray` (optional extra) fans them out as
Ray tasks. Both skip runs already finished in the store, so sweeps resume."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from batchlab.config import TrainConfig
from batchlab.engine.result import TrainResult
from batchlab.errors import BatchlabError, ConfigError
from batchlab.runs.continuation import KeepState
from batchlab.runs.store import Store
from batchlab.runs.training import train_many


def run_configs(configs: Sequence[TrainConfig], store: Store, *, executor: str = "local",
                ray_address: str | None = None, label: str | None = None,
                progress: Callable[[str, float, float], None] | None = None,
                keep_state: KeepState = False, **ray_kw: Any) -> list[TrainResult]:
    """`keep_state`: runs keep their end state for longer configs to continue (local only:
    Ray tasks train every run from scratch)."""
    if executor == "local":
        return run_local(configs, store, label=label, progress=progress, keep_state=keep_state)
    if executor == "ray":
        if any(c.data is not None or not c.builtin_model for c in configs):
            raise ConfigError("--executor ray runs the built-in models on built-in datasets; "
                              "use --executor local for a user's --model/--data")
        try:
            from batchlab.runs.ray_executor import run_ray
        except ImportError as e:
            raise BatchlabError(f"--executor ray needs Ray: pip install 'batchlab[ray]' ({e})") from None
        return run_ray(configs, store, address=ray_address, label=label, progress=progress, **ray_kw)
    raise ConfigError(f"unknown executor {executor!r}; use local or ray")


def run_local(configs: Sequence[TrainConfig], store: Store, *, label: str | None = None,
              progress: Callable[[str, float, float], None] | None = None,
              keep_state: KeepState = False) -> list[TrainResult]:
    """Train `configs` here, in order. Configs that can share a pass (seeds, lrs, inits on one
    batch-size schedule) are trained together when the measured rule says that is faster
    (`batchlab.engine.vectorized`). A run that crashes is stored as failed and the sweep goes
    on; bad input (`BatchlabError`) stops it."""
    name, total, done = label or "runs", len(configs), [0]

    def advance(n: int) -> None:  # progress(description, done, total): the CLI draws a bar
        done[0] += n
        if progress is not None:
            progress(name, done[0], total)

    return train_many(configs, store, label=label, on_error="record", on_done=advance,
                      keep_state=keep_state)
