"""Command line: `batchlab train | sweep | runs | experiment | reproduce | recommend | data`.

Every user error is one line on stderr and exit code 2 (see `main`); progress goes to stderr
through rich, so `--json` output on stdout stays machine-readable.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from batchlab.errors import BatchlabError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Study how batch size shapes neural-network training.")
runs_app = typer.Typer(no_args_is_help=True, help="Inspect and export stored runs.")
app.add_typer(runs_app, name="runs")

err = Console(stderr=True)
out = Console()

StoreOpt = Annotated[Path, typer.Option("--store", help="SQLite results store.")]
DataDirOpt = Annotated[Optional[str], typer.Option("--data-dir", help="Directory of IDX files.")]


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


def fail(msg: str) -> None:
    raise BatchlabError(msg)


@app.command()
def train(
    ctx: typer.Context,
    dataset: Annotated[str, typer.Option(help="mnist, fashion-mnist, mnist-5k or digits.")] = "mnist-5k",
    batch_size: Annotated[int, typer.Option("--batch-size")] = 64,
    lr: Annotated[float, typer.Option()] = 0.01,
    epochs: Annotated[int, typer.Option()] = 30,
    optimizer: Annotated[str, typer.Option()] = "sgd",
    momentum: Annotated[float, typer.Option()] = 0.0,
    weight_decay: Annotated[float, typer.Option("--weight-decay")] = 0.0,
    init: Annotated[str, typer.Option()] = "glorot",
    seed: Annotated[int, typer.Option()] = 0,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.")] = "auto",
    data_dir: DataDirOpt = None,
    store: StoreOpt = Path("batchlab.db"),
    config: Annotated[Optional[Path], typer.Option("--config", help="TOML file of TrainConfig fields (flags given explicitly override it).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object on stdout.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q")] = False,
) -> None:
    """Train one run (stored; an identical finished run is returned from the store)."""
    from batchlab.config import make_config
    from batchlab.runs.store import Store
    from batchlab.runs.sweep import tomllib, validate_against_data
    from batchlab.runs.training import train as run_train

    fields: dict[str, Any] = {}
    if config is not None:
        try:
            fields.update(tomllib.loads(config.read_text()))
        except (OSError, tomllib.TOMLDecodeError) as e:
            fail(f"cannot read config {config}: {e}")
    flags = dict(dataset=dataset, batch_size=batch_size, lr=lr, epochs=epochs,
                 optimizer=optimizer, momentum=momentum, weight_decay=weight_decay, init=init,
                 seed=seed, device=device, data_dir=data_dir)
    for k, v in flags.items():
        if config is None or _given(ctx, k):
            fields[k] = v
    cfg = make_config(**fields)
    validate_against_data([cfg])  # bad data/batch size fails before the store file is touched
    with Store(store) as st:
        res = run_train(cfg, store=st, reporter=RichReporter(quiet or as_json))
    if as_json:
        sys.stdout.write(json.dumps(res.to_json()) + "\n")
        return
    f = res.final
    tag = " (from store)" if res.cached else ""
    out.print(f"run [bold]{res.run_id}[/] {res.status}{tag}: test_acc {f.get('test_acc', 0):.4f}"
              f"  train_acc {f.get('train_acc', 0):.4f}  epochs {f.get('epoch')}"
              f"  train {f.get('train_seconds', 0):.1f}s")


def _col(name: str) -> dict[str, Any]:
    """Keep run ids whole in narrow terminals, so they can be copied into `runs show`."""
    return {"no_wrap": True, "min_width": 12} if name == "run_id" else {}


def _print_table(t: Table) -> None:
    """Pipes get the table's natural width (rich would assume 80 columns and cut cells)."""
    (out if out.is_terminal else Console(width=1000)).print(t)


def _given(ctx: Any, name: str) -> bool:
    src = ctx.get_parameter_source(name)
    return src is not None and src.name not in ("DEFAULT", "DEFAULT_MAP")


@app.command()
def sweep(
    grid: Annotated[Path, typer.Argument(
        help="TOML file: a 'base' table of train fields, a 'grid' table of lists.")],
    store: StoreOpt = Path("batchlab.db"),
    executor: Annotated[str, typer.Option(help="local or ray.")] = "local",
    ray_address: Annotated[Optional[str], typer.Option("--ray-address", help="auto or HOST:PORT; none starts a local Ray.")] = None,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Run the Cartesian product of a grid; finished runs are skipped (resumable)."""
    from batchlab.runs.executors import run_configs
    from batchlab.runs.store import Store
    from batchlab.runs.sweep import expand, load_grid, validate_against_data

    base, g = load_grid(grid)
    configs = expand(base, g)
    validate_against_data(configs)
    with Store(store) as st:
        results = run_configs(configs, st, executor=executor, ray_address=ray_address,
                              label=f"sweep:{grid.stem}", console=err)
    rows = [{"run_id": r.run_id, "status": r.status, "batch_size": r.config.batch_size,
             "lr": r.config.lr, "seed": r.config.seed, "test_acc": r.final.get("test_acc"),
             "train_acc": r.final.get("train_acc"), "cached": r.cached} for r in results]
    if as_json:
        sys.stdout.write(json.dumps(rows) + "\n")
        return
    t = Table(title=f"sweep {grid.name}: {len(rows)} runs")
    for c in ("run_id", "status", "batch_size", "lr", "seed", "test_acc", "train_acc", "cached"):
        t.add_column(c, **_col(c))
    for r in rows:
        t.add_row(*[f"{v:.4f}" if isinstance(v, float) else str(v) for v in r.values()])
    _print_table(t)


@runs_app.command("list")
def runs_list(
    store: StoreOpt = Path("batchlab.db"),
    label: Annotated[Optional[str], typer.Option()] = None,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """List stored runs."""
    from batchlab.runs.store import Store

    if not store.exists():
        fail(f"no results store at {store}")
    with Store(store) as st:
        recs = st.runs(label=label)
    rows = [{"run_id": r.run_id, "status": r.status, "label": r.label, "dataset": r.config.get("dataset"),
             "optimizer": r.config.get("optimizer"), "batch_size": r.config.get("batch_size"),
             "lr": r.config.get("lr"), "epochs": r.config.get("epochs"), "seed": r.seed,
             "test_acc": r.final.get("test_acc"), "seconds": r.wall_seconds} for r in recs]
    if as_json:
        sys.stdout.write(json.dumps(rows) + "\n")
        return
    t = Table(title=f"{len(rows)} runs in {store}")
    for c in rows[0] if rows else ["run_id"]:
        t.add_column(c, **_col(c))
    for r in rows:
        t.add_row(*[f"{v:.4f}" if isinstance(v, float) else str(v) for v in r.values()])
    _print_table(t)


@runs_app.command("show")
def runs_show(run_id: str, store: StoreOpt = Path("batchlab.db"),
              as_json: Annotated[bool, typer.Option("--json")] = False) -> None:
    """Show one run's config and per-epoch metrics."""
    from batchlab.runs.store import Store

    if not store.exists():
        fail(f"no results store at {store}")
    with Store(store) as st:
        rec = st.get(run_id)
    if rec is None:
        fail(f"no run {run_id!r} in {store}")
    doc = {"run_id": rec.run_id, "status": rec.status, "error": rec.error, "label": rec.label,
           "config": rec.config, "final": rec.final, "env": rec.env, "epochs": rec.epochs,
           "artifacts": rec.artifacts}
    if as_json:
        sys.stdout.write(json.dumps(doc) + "\n")
        return
    out.print_json(json.dumps({k: v for k, v in doc.items() if k != "epochs"}))
    t = Table(title="epochs")
    cols = ["epoch", "batch_size", "lr", "steps", "train_loss", "train_acc", "test_loss", "test_acc", "dist_init_w", "seconds"]
    for c in cols:
        t.add_column(c)
    for e in rec.epochs:
        t.add_row(*[f"{e[c]:.4g}" if isinstance(e.get(c), float) else str(e.get(c, "")) for c in cols])
    out.print(t)


@runs_app.command("export")
def runs_export(
    store: StoreOpt = Path("batchlab.db"),
    fmt: Annotated[str, typer.Option("--format", help="csv or parquet.")] = "csv",
    output: Annotated[Optional[Path], typer.Option("--output", "-o")] = None,
) -> None:
    """Export every (run, epoch) row as CSV or Parquet."""
    from batchlab.runs.store import Store

    if fmt not in ("csv", "parquet"):
        fail(f"unknown export format {fmt!r}; use csv or parquet")
    if not store.exists():
        fail(f"no results store at {store}")
    output = output or Path(f"runs.{fmt}")
    with Store(store) as st:
        n = st.export(output, fmt)
    err.print(f"wrote {n} rows to {output}")


@app.command()
def data(
    dataset: Annotated[str, typer.Argument(help="mnist, fashion-mnist, mnist-5k or digits.")],
    data_dir: DataDirOpt = None,
) -> None:
    """Load (downloading into the cache if needed), validate and describe a dataset."""
    from batchlab.data import load_dataset

    raw = load_dataset(dataset, data_dir)
    out.print(f"{dataset}: {len(raw.y_train)} train, {len(raw.y_test)} test, images {raw.image_shape}, "
              f"source {raw.source}, sha256 {raw.fingerprint[:16]}")


def _register_plugins() -> None:
    """Commands defined next to their features (experiments, recommend, ...)."""
    import importlib

    for mod in ("batchlab.cli.experiment", "batchlab.cli.recommend", "batchlab.cli.presets"):
        try:
            m = importlib.import_module(mod)
        except ModuleNotFoundError as e:
            if e.name == mod:
                continue
            raise
        m.register(app)


_register_plugins()


def main() -> None:
    """Entry point: user errors -> one line on stderr, exit 2; never a traceback for them."""
    from pydantic import ValidationError

    from batchlab.config import format_validation_error

    try:
        rc = app(standalone_mode=False)
        if rc == 130:  # typer turns Ctrl-C into a *returned* 130 without standalone mode
            raise KeyboardInterrupt
    except BatchlabError as e:
        err.print(f"[red]error:[/] {e}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except ValidationError as e:
        err.print(f"[red]error:[/] {format_validation_error(e)}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except KeyboardInterrupt:
        err.print("interrupted; finished runs are stored, re-run to resume")
        sys.exit(130)
    except Exception as e:  # click's (typer's vendored click) usage errors, by duck type
        name = type(e).__name__
        if hasattr(e, "format_message") and hasattr(e, "exit_code"):
            err.print(f"[red]error:[/] {e.format_message()}", highlight=False, soft_wrap=True)
            sys.exit(2)
        if name == "Exit":
            sys.exit(getattr(e, "exit_code", 0))
        if name == "Abort":
            sys.exit(130)
        raise


if __name__ == "__main__":
    main()
