"""Command line: `batchlab train | sweep | runs | experiment | reproduce | recommend | data`.

Every user error is one line on stderr and exit code 2, every bug one line naming a log file
(see `batchlab.cli.boundary`); progress goes to stderr through rich, so `--json` output on
stdout stays machine-readable.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table
from rich.text import Text

from batchlab.cli.boundary import emit_json, run_guarded
from batchlab.cli.options import (
    AmpOpt,
    BatchSizeOpt,
    ConfigOpt,
    DataDirOpt,
    DataOpt,
    Dataset,
    DatasetOpt,
    DeviceOpt,
    EpochsOpt,
    ExecutorOpt,
    Init,
    JsonOpt,
    LossOpt,
    LrOpt,
    ModelOpt,
    OptimizerOpt,
    QuietOpt,
    RayOpt,
    SeedOpt,
    StoreOpt,
)
from batchlab.cli.progress import ProgressBars
from batchlab.cli.runs import cell, check_store_folder, col, print_table, runs_app, warn_distrusted
from batchlab.cli.trainflags import given, with_config_flags

app = typer.Typer(add_completion=True, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Study how batch size shapes neural-network training.")
app.add_typer(runs_app, name="runs")

err = Console(stderr=True)
out = Console()



def _version(value: bool) -> None:
    if value:
        import batchlab

        typer.echo(f"batchlab {batchlab.__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True, metavar="",
                                          help="Print the version and exit.")] = False,
) -> None:
    """Study how batch size shapes neural-network training."""


class RichReporter:
    """Epoch bar with ETA plus a step bar inside long epochs, on stderr."""

    def __init__(self, quiet: bool = False, desc: str = "train") -> None:
        self.quiet = quiet
        self.desc = desc
        self.progress: Progress | None = None

    def start(self, cfg: Any, total_epochs: int) -> None:
        if self.quiet:
            return
        self.progress = Progress(
            TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("{task.fields[info]}"), TimeRemainingColumn(), console=err,
            transient=True,
        )
        self.progress.start()
        self.ep_task = self.progress.add_task(self.desc, total=total_epochs, info="")
        self.st_task = self.progress.add_task("  steps", total=1, info="")

    def steps(self, done: int, total: int) -> None:
        if self.progress:
            self.progress.update(self.st_task, completed=done, total=total)

    def epoch(self, m: dict[str, Any]) -> None:
        if self.progress:
            info = f"test_acc {m.get('test_acc', float('nan')):.4f}  loss {m.get('train_loss', float('nan')):.4f}"
            self.progress.update(self.ep_task, advance=1, info=info)

    def finish(self) -> None:
        if self.progress:
            self.progress.stop()
            self.progress = None


@app.command()
@with_config_flags
def train(
    ctx: typer.Context,
    dataset: DatasetOpt = "mnist-5k",
    model: ModelOpt = "mlp",
    data: DataOpt = None,
    batch_size: BatchSizeOpt = 64,
    lr: LrOpt = 0.01,
    epochs: EpochsOpt = 30,
    optimizer: OptimizerOpt = "sgd",
    loss: LossOpt = "cross_entropy",
    amp: AmpOpt = "off",
    momentum: Annotated[float, typer.Option(help="Momentum in [0, 1).")] = 0.0,
    weight_decay: Annotated[float, typer.Option("--weight-decay", help="L2 weight decay (>= 0).")] = 0.0,
    init: Annotated[Init, typer.Option(help="Weight initialization.")] = "glorot",
    seed: SeedOpt = 0,
    device: DeviceOpt = "auto",
    data_dir: DataDirOpt = None,
    store: StoreOpt = Path("batchlab.db"),
    config: ConfigOpt = None,
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
    extra: Optional[dict[str, Any]] = None,
) -> None:
    """Train one run (stored; an identical finished run is returned from the store).

    Every scalar TrainConfig field has a flag; list-valued ones (hidden, betas, schedule,
    decay_epochs, ...) are set in the --config TOML."""
    from batchlab.atomic import check_writable
    from batchlab.config import make_config
    from batchlab.engine.setup import resolve_device
    from batchlab.runs.store import Store
    from batchlab.runs.sweep import read_toml, validate_against_data
    from batchlab.runs.training import train as run_train

    fields: dict[str, Any] = {}
    if config is not None:
        fields.update(read_toml(config, "config"))
    flags = dict(dataset=dataset, model=model, data=data, batch_size=batch_size, lr=lr, epochs=epochs,
                 optimizer=optimizer, loss=loss, amp=amp, momentum=momentum, weight_decay=weight_decay, init=init,
                 seed=seed, device=device, data_dir=data_dir)
    for k, v in flags.items():
        if config is None or given(ctx, k):
            fields[k] = v
    fields.update(extra or {})  # the generated flags given explicitly
    cfg = make_config(**fields)
    check_store_folder(store)
    check_writable(store, "--store")
    resolve_device(cfg.device)  # an unavailable device is refused before the store is made
    validate_against_data([cfg])  # bad data/batch size fails before the store file is touched
    with Store(store) as st:
        res = run_train(cfg, store=st, reporter=RichReporter(quiet or as_json))
    warn_distrusted(st)
    if as_json:
        emit_json(res.to_json())
        return
    f = res.final
    tag = " (from store)" if res.cached else ""
    m = f.get("metric", "acc")
    out.print(f"run [bold]{res.run_id}[/] {res.status}{tag}: test_{m} {f.get(f'test_{m}') or 0:.4f}"
              f"  train_{m} {f.get(f'train_{m}') or 0:.4f}  epochs {f.get('epoch')}"
              f"  train {f.get('train_seconds', 0):.1f}s")


@app.command()
def sweep(
    grid: Annotated[Path, typer.Argument(
        help="TOML file: a 'base' table of train fields, a 'grid' table of lists.")],
    store: StoreOpt = Path("batchlab.db"),
    executor: ExecutorOpt = "local",
    ray_address: RayOpt = None,
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Run the Cartesian product of a grid; finished runs are skipped (resumable)."""
    from batchlab.atomic import check_writable
    from batchlab.engine.setup import resolve_device
    from batchlab.runs.executors import run_configs
    from batchlab.runs.store import Store
    from batchlab.runs.sweep import expand, load_grid, validate_against_data

    base, g = load_grid(grid)
    configs = expand(base, g)
    check_store_folder(store)
    check_writable(store, "--store")
    for device in {c.device for c in configs}:
        resolve_device(device)  # an unavailable device is refused before the store is made
    validate_against_data(configs)
    with Store(store) as st:
        results = run_configs(configs, st, executor=executor, ray_address=ray_address,
                              label=f"sweep:{grid.stem}",
                              progress=ProgressBars(err, enabled=not (quiet or as_json)))
    warn_distrusted(st)
    rows = [{"run_id": r.run_id, "status": r.status, "batch_size": r.config.batch_size,
             "lr": r.config.lr, "seed": r.config.seed, "test_acc": r.final.get("test_acc"),
             "train_acc": r.final.get("train_acc"), "cached": r.cached} for r in results]
    if as_json:
        emit_json({"grid": str(grid), "runs": rows})
        return
    t = Table(title=Text(f"sweep {grid.name}: {len(rows)} runs"))
    for c in ("run_id", "status", "batch_size", "lr", "seed", "test_acc", "train_acc", "cached"):
        t.add_column(c, **col(c))
    for r in rows:
        t.add_row(*[cell(v) for v in r.values()])
    print_table(t)


@app.command()
def data(
    dataset: Annotated[Dataset, typer.Argument(help="Built-in data set.")],
    data_dir: DataDirOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Load (downloading into the cache if needed), validate and describe a dataset."""
    from batchlab.data import load_dataset

    raw = load_dataset(dataset, data_dir)
    if as_json:
        emit_json({"dataset": dataset, "train": len(raw.y_train), "test": len(raw.y_test),
                   "image_shape": list(raw.image_shape), "source": str(raw.source),
                   "sha256": raw.fingerprint})
        return
    out.print(Text(f"{dataset}: {len(raw.y_train)} train, {len(raw.y_test)} test, images {raw.image_shape}, "
                   f"source {raw.source}, sha256 {raw.fingerprint[:16]}"), soft_wrap=True)


def _register_plugins() -> None:
    """Commands defined next to their features (experiments, recommend, ...)."""
    import importlib

    for mod in ("batchlab.cli.experiment", "batchlab.cli.recommend", "batchlab.cli.recipes"):
        try:
            m = importlib.import_module(mod)
        except ModuleNotFoundError as e:
            if e.name == mod:
                continue
            raise
        m.register(app)


_register_plugins()


def main() -> None:
    """Entry point: user errors -> one line on stderr, exit 2; bugs -> one line naming a log
    file with the traceback, exit 1 (see `batchlab.cli.boundary`)."""
    run_guarded(lambda: app(standalone_mode=False))


if __name__ == "__main__":
    main()
