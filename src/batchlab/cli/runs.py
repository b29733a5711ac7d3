"""`batchlab runs list | show | export | check`: read the results store.

These commands never write the store (it is opened read-only, so a shared or archived store can
be read too), and a damaged row is passed over with a warning."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any, Literal, Optional

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from batchlab.cli.boundary import emit_json, say_warning
from batchlab.cli.options import JsonOpt, LabelOpt, StoreOpt
from batchlab.errors import BatchlabError

runs_app = typer.Typer(no_args_is_help=True, help="Inspect, check and export stored runs.")
out = Console()
err = Console(stderr=True)



def open_existing(store: Path) -> Any:
    """The store at `store`, opened read-only (reading never changes a store, and works on a
    read-only file); one line if it is not there."""
    from batchlab.runs.store import Store

    if not store.exists():
        raise BatchlabError(f"no results store at {store}")
    return Store(store, readonly=True)


def check_store_folder(store: Path) -> None:
    """A --store whose folder does not exist is refused (a typo in the path would otherwise
    grow a tree of folders holding a fresh, empty store)."""
    folder = store.expanduser().absolute().parent
    if not folder.exists():
        raise BatchlabError(f"--store {store}: folder {folder} does not exist; create it first "
                            f"or give another path")


def warn_skipped(st: Any) -> None:
    for run_id, why in st.skipped:
        say_warning(f"skipped damaged run {run_id} ({why}); see `batchlab runs check --store {st.path}`")


def warn_distrusted(st: Any, quiet: bool = False) -> None:
    """Print the store's warnings about stored data it did not trust (and recomputed), at the
    end of the command: always, --quiet or not (a tampered store must never pass unnoticed,
    and a progress log may have been silenced or never shown)."""
    for msg, _shown in getattr(st, "warnings", []):
        say_warning(msg)


def cell(v: Any) -> Text:
    """A table cell as plain text (rich markup in a label must not be interpreted)."""
    return Text(f"{v:.4f}" if isinstance(v, float) else str(v))


def col(name: str) -> dict[str, Any]:
    """Keep run ids whole in narrow terminals, so they can be copied into `runs show`."""
    return {"no_wrap": True, "min_width": 12} if name == "run_id" else {}


def print_table(t: Table) -> None:
    """Pipes get the table's natural width (rich would assume 80 columns and cut cells)."""
    (out if out.is_terminal else Console(width=1000)).print(t)


@runs_app.command("list")
def runs_list(
    store: StoreOpt = Path("batchlab.db"),
    label: LabelOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """List stored runs."""
    with open_existing(store) as st:
        recs = st.runs(label=label)
        warn_skipped(st)
    rows = [{"run_id": r.run_id, "status": r.status, "label": r.label, "dataset": r.config.get("dataset"),
             "optimizer": r.config.get("optimizer"), "batch_size": r.config.get("batch_size"),
             "lr": r.config.get("lr"), "epochs": r.config.get("epochs"), "seed": r.seed,
             "test_acc": r.final.get("test_acc"), "seconds": r.wall_seconds} for r in recs]
    if as_json:
        emit_json({"store": str(store), "runs": rows})
        return
    t = Table(title=Text(f"{len(rows)} runs in {store}"))
    for c in rows[0] if rows else ["run_id"]:
        t.add_column(c, **col(c))
    for r in rows:
        t.add_row(*[cell(v) for v in r.values()])
    print_table(t)


@runs_app.command("show")
def runs_show(
    run_id: Annotated[str, typer.Argument(help="Run id or config hash, or a unique prefix (4+ characters).")],
    store: StoreOpt = Path("batchlab.db"),
    as_json: JsonOpt = False,
) -> None:
    """Show one run's config and per-epoch metrics."""
    from batchlab.runs.upkeep import check_artifacts

    with open_existing(store) as st:
        rec = st.get(run_id)
    if rec is None:
        raise BatchlabError(f"no run {run_id[:80]!r} in {store}")
    arts = [(rec.run_id, n, p, sh) for n, (p, sh) in rec.artifacts.items()]
    for problem in check_artifacts(arts, weights=rec.status == "completed"):
        say_warning(f"{problem}; `batchlab runs delete --damaged --store {store}` deletes it, so "
                    f"it is recomputed")
    doc = {"run_id": rec.run_id, "status": rec.status, "error": rec.error, "label": rec.label,
           "config": rec.config, "final": rec.final, "env": rec.env, "epochs": rec.epochs,
           "artifacts": rec.artifacts}
    if as_json:
        emit_json(doc)
        return
    out.print_json(json.dumps({k: v for k, v in doc.items() if k != "epochs"}))
    t = Table(title="epochs")
    cols = ["epoch", "batch_size", "lr", "steps", "train_loss", "train_acc", "test_loss", "test_acc", "dist_init_w", "seconds"]
    for c in cols:
        t.add_column(c)
    for e in rec.epochs:
        t.add_row(*[Text(f"{e[c]:.4g}") if isinstance(e.get(c), float) else cell(e.get(c, "")) for c in cols])
    out.print(t)


@runs_app.command("export")
def runs_export(
    store: StoreOpt = Path("batchlab.db"),
    fmt: Annotated[Literal["csv", "parquet"], typer.Option("--format", help="File format (parquet needs pyarrow).")] = "csv",
    output: Annotated[Optional[Path], typer.Option("--output", "-o", help="File to write (default runs.FORMAT); missing folders are created.")] = None,
    force: Annotated[bool, typer.Option("--force", metavar="", help="Replace an existing output file (a results store is never replaced).")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Export every (run, epoch) row as CSV or Parquet."""
    from batchlab.atomic import check_output

    output = output or Path(f"runs.{fmt}")
    # before reading anything: never a store, its WAL or artifacts; an existing file if forced
    check_output(output, "--output", force=force, stores=(store,))
    with open_existing(store) as st:
        n = st.export(output, fmt)
        warn_skipped(st)
    if as_json:
        emit_json({"store": str(store), "output": str(output), "format": fmt, "rows": n})
    else:
        sys.stderr.write(f"wrote {n} rows to {output}\n")


@runs_app.command("check")
def runs_check(store: StoreOpt = Path("batchlab.db"), as_json: JsonOpt = False) -> None:
    """Check a store: SQLite's integrity check, every row readable, every checkpoint file
    present with its recorded sha256. Exit 0 when all is well, 2 when something is damaged."""
    from batchlab.runs.store import DamagedStore, Store, salvage

    if not store.exists():
        raise BatchlabError(f"no results store at {store}")
    try:
        with Store(store, readonly=True) as st:
            found = st.check_runs()
            n = st.count()
    except DamagedStore as e:
        runs, epochs = salvage(store)
        why = str(e).split(" is damaged ", 1)[-1].split(";", 1)[0]
        keep = (f"{runs} runs and {epochs} epoch rows are still readable: `batchlab runs export "
                f"--store {store} -o saved.csv` saves what it can read; " if runs else
                "nothing in it is readable; ")
        raise BatchlabError(f"results store {store} is damaged {why}: {keep}restore it from a "
                            f"backup, or move it away (`mv {store} {store}.damaged`) and run your "
                            f"configs again to recompute its runs") from None
    problems = [p for _, p in found]
    if as_json:
        emit_json({"store": str(store), "runs": n, "problems": problems})
    else:
        for p in problems:
            out.print(Text(p), soft_wrap=True)  # one line per problem, greppable
    if problems:
        hint = (f"`batchlab runs delete --damaged --store {store}` deletes the damaged runs; "
                f"their configs are then recomputed when run again"
                if any(rid for rid, _ in found) else
                "damaged measurements are recomputed when their experiment runs again")
        raise BatchlabError(f"{store}: {len(problems)} problem(s) among {n} runs; {hint}")
    if not as_json:
        out.print(Text(f"{store}: {n} runs, no problems"))


@runs_app.command("delete")
def runs_delete(
    keys: Annotated[Optional[list[str]], typer.Argument(help="Run ids or config hashes (or unique prefixes, 4+ characters).")] = None,
    store: StoreOpt = Path("batchlab.db"),
    label: LabelOpt = None,
    status: Annotated[Optional[str], typer.Option(help="Every run of this status (completed, diverged, failed).")] = None,
    damaged: Annotated[bool, typer.Option("--damaged", metavar="", help="Every run `batchlab runs check` finds damaged.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Delete runs (rows and checkpoints), so their configs are recomputed when run again."""
    from batchlab.runs.store import Store

    if not keys and label is None and status is None and not damaged:
        raise BatchlabError("say what to delete: run ids, --label, --status or --damaged")
    if not store.exists():
        raise BatchlabError(f"no results store at {store}")
    with Store(store) as st:
        ids: list[str] = []
        for k in keys or []:
            rid = st.match(k)
            if rid is None:
                raise BatchlabError(f"no run {k[:80]!r} in {store} (nothing deleted)")
            ids.append(rid)
        if label is not None or status is not None:
            ids += st.run_ids(label=label, status=status)
        if damaged:
            ids += [rid for rid, _ in st.check_runs() if rid is not None]
        ids = list(dict.fromkeys(ids))
        n = st.delete(ids)
    if as_json:
        emit_json({"store": str(store), "deleted": ids})
    else:
        sys.stderr.write(f"deleted {n} run(s) from {store}\n")


@runs_app.command("prune-states")
def runs_prune_states(
    store: StoreOpt = Path("batchlab.db"),
    label: LabelOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Remove the end states runs kept so that longer runs could continue them (7.5 MB per
    paper-scale run, 15 MB with momentum). Every result stays; a longer run of the same
    config then trains from scratch, and gradient competition retrains a late checkpoint it
    read from a state."""
    from batchlab.runs.continuation import drop_states
    from batchlab.runs.store import Store

    if not store.exists():
        raise BatchlabError(f"no results store at {store}")
    with Store(store) as st:
        n, freed = drop_states(st, st.run_ids(label=label))
    if as_json:
        emit_json({"store": str(store), "states_removed": n, "bytes_freed": freed})
    else:
        sys.stderr.write(f"removed {n} kept state(s), {freed / 1e6:.1f} MB, from {store}\n")
