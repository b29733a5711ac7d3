"""`batchlab schedule-preset NAME`: a large-batch schedule recipe's fields as TOML (the command
keeps the name users type; inside the package these are "recipes", `engine.recipes`, so that
"preset" means only the quick/paper budget)."""

from __future__ import annotations

import math
import re
from typing import Annotated, Any, Literal, Optional

import typer

from batchlab.cli.boundary import emit_json
from batchlab.cli.options import BatchSizeOpt, ConfigOpt, JsonOpt, MaxBatchOpt
from batchlab.cli.trainflags import FIELD_HELP
from batchlab.engine.recipes import ALIASES, Fields, apply_recipe, recipe_toml
from batchlab.errors import ConfigError

Recipe = Literal["goyal", "smith", "hoffer", "linear-warmup", "increase-batch", "regime-adaptation"]


def register(app: Any) -> None:
    """`batchlab schedule-preset NAME`: print a schedule recipe's fields as TOML, so it runs with
    `batchlab train --config FILE` or as a sweep's `[base]` (no new flags on train/sweep)."""
    @app.command("schedule-preset")
    def schedule_preset(
        name: Annotated[Recipe, typer.Argument(help="Schedule recipe (linear-warmup = goyal, increase-batch = "
                                               "smith, regime-adaptation = hoffer).")],
        config: ConfigOpt = None,
        batch_size: BatchSizeOpt = None,
        base_batch: Annotated[Optional[int], typer.Option("--base-batch", help="Batch of the small-batch config (>= 1).")] = None,
        warmup_epochs: Annotated[float, typer.Option("--warmup-epochs", help=FIELD_HELP["warmup_epochs"])] = 5.0,
        max_batch: MaxBatchOpt = None,
        table: Annotated[Optional[str], typer.Option("--table", help="Write the fields under this TOML table, e.g. base (a sweep file).")] = None,
        as_json: JsonOpt = False,
    ) -> None:
        """Print a large-batch schedule recipe's TrainConfig fields as TOML."""
        from batchlab.config import make_config
        from batchlab.runs.sweep import read_toml

        base: Fields = read_toml(config, "config") if config is not None else {}
        valid = make_config(**base).model_dump(mode="json")  # wrong types: one line, here
        base = {k: base[k] if isinstance(valid[k], (list, dict)) else valid[k] for k in base}
        if table is not None and not re.fullmatch(r"[A-Za-z0-9_-]{1,64}", table):
            raise ConfigError(f"--table {table!r} must be a bare TOML name (letters, digits, _ and -)")
        if not math.isfinite(warmup_epochs) or warmup_epochs < 0:
            raise ConfigError(f"--warmup-epochs must be a finite number >= 0, got {warmup_epochs}")
        key = ALIASES.get(name, name)
        if key in ("goyal", "hoffer") and batch_size is None:
            raise ConfigError(f"recipe {name} needs --batch-size (the large batch)")
        kw: dict[str, Any] = {"base_batch": base_batch, "warmup_epochs": warmup_epochs,
                              "max_batch": max_batch}
        for flag_name, v in (("--batch-size", batch_size), ("--base-batch", base_batch),
                             ("--max-batch", max_batch)):
            if v is not None and v < 1:
                raise ConfigError(f"{flag_name} must be >= 1, got {v}")
        if batch_size is not None:
            kw["batch_size"] = batch_size
        fields = apply_recipe(name, base, **kw)
        if as_json:
            emit_json({"preset": name, "table": table, "fields": fields})
            return
        typer.echo(recipe_toml(fields, table), nl=False)
