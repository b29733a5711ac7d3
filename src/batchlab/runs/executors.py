"""Executors run a list of configs and stream finished results back to the one writer of the
store (this process). `local` runs them in order here; `ray` (optional extra) fans them out as
Ray tasks. Both skip runs already finished in the store, so sweeps resume."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from batchlab.config import TrainConfig
from batchlab.engine.train import TrainResult, train
from batchlab.errors import BatchlabError, ConfigError
from batchlab.runs.store import Store


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
    # configs that can share a pass (seeds, lrs, inits on one batch-size schedule) are trained
    # together by batchlab.engine.vectorized when its measured rule says that is faster
    from batchlab.engine.vectorized import plan_groups, train_many

    results: dict[int, TrainResult] = {}
    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), console=console or Console(stderr=True),
                  transient=True) as prog:
        task = prog.add_task(label or "runs", total=len(configs))
        for unit in plan_groups(configs):
            if len(unit) > 1:
                try:
                    group = train_many([configs[i] for i in unit], store=store, label=label)
                    results.update(zip(unit, group))
                    prog.advance(task, len(unit))
                    continue
                except BatchlabError:
                    raise
                except Exception:  # one by one below, which records the failed run
                    pass
            for i in unit:
                results[i] = _run_one(configs[i], store, label)
                prog.advance(task)
    return [results[i] for i in range(len(configs))]


def _run_one(cfg: TrainConfig, store: Store, label: str | None) -> TrainResult:
    try:
        return train(cfg, store=store, label=label)
    except BatchlabError:
        raise
    except Exception:  # stored as failed by train(); the sweep goes on
        rec = store.get(cfg.key(_fingerprint(cfg)))
        return TrainResult(run_id=rec.run_id if rec else "?", key="", config=cfg,
                           status="failed", epochs=[], final={},
                           error=rec.error if rec else None)


def _fingerprint(cfg: TrainConfig) -> str:
    from batchlab.engine.train import get_data, resolve_device
    from batchlab.nn.factory import run_fingerprint

    return run_fingerprint(cfg, get_data(cfg, resolve_device(cfg.device)))
