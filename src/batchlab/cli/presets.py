"""`batchlab schedule-preset NAME`: a large-batch schedule preset's fields as TOML."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Literal, Optional

import typer

from batchlab.engine.presets import ALIASES, Fields, apply_preset, preset_toml
from batchlab.errors import ConfigError

Preset = Literal["goyal", "smith", "hoffer", "linear-warmup", "increase-batch", "regime-adaptation"]


def register(app: Any) -> None:
    """`batchlab schedule-preset NAME`: print a preset's fields as TOML, so it runs with
    `batchlab train --config FILE` or as a sweep's `[base]` (no new flags on train/sweep)."""
    @app.command("schedule-preset")
    def schedule_preset(
        name: Annotated[Preset, typer.Argument(help="Preset (linear-warmup = goyal, increase-batch = "
                                               "smith, regime-adaptation = hoffer).")],
        config: Annotated[Optional[Path], typer.Option("--config", help="TOML of the small-batch recipe.")] = None,
        batch_size: Annotated[Optional[int], typer.Option("--batch-size", help="Large batch (goyal, hoffer).")] = None,
        base_batch: Annotated[Optional[int], typer.Option("--base-batch", help="Batch of the recipe.")] = None,
        warmup_epochs: Annotated[float, typer.Option("--warmup-epochs", help="Warmup length in epochs (goyal).")] = 5.0,
        max_batch: Annotated[Optional[int], typer.Option("--max-batch", help="Largest batch (smith).")] = None,
        table: Annotated[Optional[str], typer.Option("--table", help="Write the fields under this TOML table, e.g. base (a sweep file).")] = None,
    ) -> None:
        """Print a large-batch schedule preset's TrainConfig fields as TOML."""
        from batchlab.config import make_config
        from batchlab.runs.sweep import read_toml

        base: Fields = read_toml(config, "config") if config is not None else {}
        valid = make_config(**base).model_dump(mode="json")  # wrong types: one line, here
        base = {k: base[k] if isinstance(valid[k], (list, dict)) else valid[k] for k in base}
        if table is not None and not re.fullmatch(r"[A-Za-z0-9_-]{1,64}", table):
            raise ConfigError(f"--table {table!r} must be a bare TOML name (letters, digits, _ and -)")
        key = ALIASES.get(name, name)
        if key in ("goyal", "hoffer") and batch_size is None:
            raise ConfigError(f"preset {name} needs --batch-size (the large batch)")
        kw: dict[str, Any] = {"base_batch": base_batch, "warmup_epochs": warmup_epochs,
                              "max_batch": max_batch}
        if batch_size is not None:
            kw["batch_size"] = batch_size
        typer.echo(preset_toml(apply_preset(name, base, **kw), table), nl=False)
