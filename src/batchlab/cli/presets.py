"""`batchlab schedule-preset NAME`: a large-batch schedule preset's fields as TOML."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from batchlab.engine.presets import ALIASES, Fields, apply_preset, preset_toml
from batchlab.errors import ConfigError


def register(app: Any) -> None:
    """`batchlab schedule-preset NAME`: print a preset's fields as TOML, so it runs with
    `batchlab train --config FILE` or as a sweep's `[base]` (no new flags on train/sweep)."""
    @app.command("schedule-preset")
    def schedule_preset(
        name: Annotated[str, typer.Argument(help="goyal, smith or hoffer (or linear-warmup, "
                                            "increase-batch, regime-adaptation).")],
        config: Annotated[Optional[Path], typer.Option("--config", help="TOML of the small-batch recipe.")] = None,
        batch_size: Annotated[Optional[int], typer.Option("--batch-size", help="Large batch (goyal, hoffer).")] = None,
        base_batch: Annotated[Optional[int], typer.Option("--base-batch", help="Batch of the recipe.")] = None,
        warmup_epochs: Annotated[float, typer.Option("--warmup-epochs")] = 5.0,
        max_batch: Annotated[Optional[int], typer.Option("--max-batch", help="Largest batch (smith).")] = None,
        table: Annotated[Optional[str], typer.Option("--table", help="Write under [TABLE], e.g. base.")] = None,
    ) -> None:
        """Print a large-batch schedule preset's TrainConfig fields as TOML."""
        from batchlab.runs.sweep import tomllib

        base: Fields = {}
        if config is not None:
            try:
                base = tomllib.loads(config.read_text())
            except (OSError, tomllib.TOMLDecodeError) as e:
                raise ConfigError(f"cannot read config {config}: {e}") from None
        key = ALIASES.get(name, name)
        if key in ("goyal", "hoffer") and batch_size is None:
            raise ConfigError(f"preset {name} needs --batch-size (the large batch)")
        kw: dict[str, Any] = {"base_batch": base_batch, "warmup_epochs": warmup_epochs,
                              "max_batch": max_batch}
        if batch_size is not None:
            kw["batch_size"] = batch_size
        typer.echo(preset_toml(apply_preset(name, base, **kw), table), nl=False)
