"""`batchlab experiment NAME | list | options NAME` and `batchlab reproduce`.

Every experiment is its own subcommand, so `batchlab experiment NAME --help` lists its typed
`--set` options (type, default, meaning) beside the common flags. `--json` prints exactly one
JSON object on stdout; progress and verdict lines go to stderr (`--quiet` silences them).
"""

from __future__ import annotations

import functools
import inspect
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from batchlab.cli.boundary import emit_json
from batchlab.cli.options import (
    DataDirOpt,
    DataOpt,
    DeviceOpt,
    ExecutorOpt,
    JsonOpt,
    ModelOpt,
    OutOpt,
    PlanOpt,
    PresetOpt,
    QuietOpt,
    RayOpt,
    SeedsOpt,
    SetOpt,
    StoreOpt,
)
from batchlab.cli.runs import check_store_folder, warn_distrusted
from batchlab.engine.setup import resolve_device
from batchlab.errors import AllRunsFailed
from batchlab.experiments import REGISTRY, available, load_plugins
from batchlab.experiments.options import describe

err = Console(stderr=True)

# experiments of other installed packages (entry points) join before the commands are built
for _line in load_plugins():
    err.print(f"[yellow]warning:[/] {escape(_line)}")

# experiments `reproduce` runs by default, in report order: all of them, plugins last
REPRODUCE_ORDER = (*REGISTRY, *(n for n in available() if n not in REGISTRY))


Names = Enum("Names", {n.replace("-", "_"): n for n in REPRODUCE_ORDER}, type=str)  # type: ignore[misc]


@dataclass
class Common:
    """The settings `batchlab experiment NAME` and `batchlab reproduce` share."""

    preset: str
    seeds: int
    data_dir: str | None
    out: Path
    store: Path
    executor: str
    ray_address: str | None
    device: str
    model: str | None
    data: str | None


# (name, annotation, default) of Common's fields as command options, declared once for both
# commands; `with_common` adds them to a command's signature
COMMON_PARAMS: tuple[tuple[str, Any, Any], ...] = (
    ("preset", PresetOpt, "quick"), ("seeds", SeedsOpt, 3), ("data_dir", DataDirOpt, None),
    ("out", OutOpt, Path("out")), ("store", StoreOpt, Path("batchlab.db")),
    ("executor", ExecutorOpt, "local"), ("ray_address", RayOpt, None), ("device", DeviceOpt, "auto"),
    ("model", ModelOpt, None), ("data", DataOpt, None),
)


def with_common(fn: Callable[..., None]) -> Callable[..., None]:
    """`fn(common, **own options)` as a typer command taking COMMON_PARAMS too, in front of
    its own options (one declaration, so the two commands cannot drift apart)."""
    own = [p for p in inspect.signature(fn, eval_str=True).parameters.values() if p.name != "common"]
    shared = [inspect.Parameter(n, inspect.Parameter.KEYWORD_ONLY, annotation=a, default=d)
              for n, a, d in COMMON_PARAMS]
    names = [n for n, _, _ in COMMON_PARAMS]

    @functools.wraps(fn)
    def command(**kw: Any) -> None:
        fn(Common(**{n: kw.pop(n) for n in names}), **kw)

    del command.__wrapped__  # typer must read the signature below, not fn's
    command.__signature__ = inspect.Signature(  # type: ignore[attr-defined]
        [*shared, *(p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in own)])
    command.__annotations__ = {}
    return command


def options_text(name: str) -> str:
    rows = describe(name)
    lines = [f"Options (--set KEY=VALUE) of {name}:", ""]
    lines += [f"  {r['option']} ({r['type']}; default {r['default']}): {r['meaning']}" for r in rows]
    return "\n\n".join(lines)


def _context(c: Common, store: Any, options: dict[str, Any], quiet: bool) -> Any:
    from batchlab.cli.progress import ProgressBars
    from batchlab.experiments import Context

    console = Console(stderr=True, quiet=quiet)
    return Context(preset=c.preset, seeds=c.seeds, data_dir=c.data_dir, out_dir=c.out, store=store,
                   executor=c.executor, ray_address=c.ray_address, device=c.device,
                   log_fn=lambda line: console.print(line, markup=False, highlight=False,
                                                     soft_wrap=True),  # greppable logs
                   options=options, model=c.model, data=c.data,
                   progress=ProgressBars(console, enabled=not quiet))


def _check_out(out: Path, store: Path, writes: tuple[str, ...]) -> None:
    """Refuse an --out folder that is a file, read-only, or where what is written (`writes`)
    would land on the results store or its artifacts."""
    from batchlab.atomic import check_output_dir

    check_output_dir(out, "--out", writes, stores=(store,))


def _make_command(name: str) -> Any:
    @with_common
    def command(
        common: Common,
        option: SetOpt = None,
        as_json: JsonOpt = False,
        quiet: QuietOpt = False,
        plan: PlanOpt = False,
    ) -> None:
        from batchlab.experiments import run_experiment
        from batchlab.experiments.options import parse_pairs, validate
        from batchlab.runs.store import Store

        opts = parse_pairs(option)
        validate(name, opts)  # a bad --set fails before the store is opened
        resolve_device(common.device)
        check_store_folder(common.store)
        _check_out(common.out, common.store, (name,))
        with Store(common.store) as st:
            ctx = _context(common, st, opts, quiet)
            if plan:
                _print_plan([(name, ctx)], as_json, quiet)
                return
            t0 = time.perf_counter()
            try:
                output, path = run_experiment(name, ctx)
            finally:
                warn_distrusted(st, quiet)
        seconds = time.perf_counter() - t0
        if not quiet:
            print_claims(output.claims)
            err.print(f"wrote {escape(str(path))} in {seconds:.0f}s", highlight=False)
        if (why := ctx.all_failed()) is not None:
            raise AllRunsFailed(f"experiment {name}: {why}")
        if as_json:
            doc = {"experiment": name, "out": str(path), "seconds": seconds,
                   "claims": [c.to_json() for c in output.claims]}
            emit_json(None, _strict_json(doc))

    command.__doc__ = f"Run the {name} experiment; writes OUT/{name}/.\n\n" + options_text(name)
    return command


def _print_plan(items: list[tuple[str, Any]], as_json: bool, quiet: bool) -> None:
    """The plan as text, or (--json) as the command's one JSON object; while it times the
    runs' shapes (minutes for the paper preset on a CPU) a status line on stderr says which
    experiment it is at."""
    from batchlab.experiments.plan import make_plan, print_plan

    status = Console(stderr=True, quiet=quiet).status("planning")
    with status:
        def at(i: int, name: str) -> None:
            status.update(f"planning {name} ({i + 1}/{len(items)}): timing its steps, "
                          "evaluations and measurements on this machine")

        if as_json:
            emit_json(make_plan(items, on_experiment=at).to_json())
        else:
            print_plan(items, on_experiment=at)


def _strict_json(doc: Any) -> str:
    from batchlab.atomic import jsonable

    return json.dumps(jsonable(doc), allow_nan=False)


def register(app: typer.Typer) -> None:
    exp_app = typer.Typer(no_args_is_help=True, help="Run one experiment, list them, or show an experiment's options.")
    app.add_typer(exp_app, name="experiment")

    @exp_app.command("list")
    def list_cmd(as_json: JsonOpt = False) -> None:
        """List the experiments."""

        names = available()
        if as_json:
            emit_json({"experiments": names})
        else:
            for n in names:
                typer.echo(n)

    @exp_app.command("options")
    def options_cmd(name: Annotated[Names, typer.Argument(help="Experiment name.")],
                    as_json: JsonOpt = False) -> None:
        """List an experiment's --set options with type, default and meaning."""
        rows = [{k: v for k, v in r.items() if not k.startswith("_")} for r in describe(name.value)]
        if as_json:
            emit_json({"experiment": name.value, "options": rows})
            return
        t = Table(title=f"options of {name.value} (--set KEY=VALUE)")
        for c in ("option", "type", "default", "meaning"):
            t.add_column(c)
        for r in rows:
            t.add_row(*[escape(str(r[c])) for c in ("option", "type", "default", "meaning")])
        Console().print(t)

    for name in REPRODUCE_ORDER:
        exp_app.command(name)(_make_command(name))

    @app.command()
    @with_common
    def reproduce(
        common: Common,
        only: Annotated[Optional[list[Names]], typer.Option("--only", help="Run just these experiments (repeatable).")] = None,
        option: SetOpt = None,
        as_json: JsonOpt = False,
        quiet: QuietOpt = False,
        plan: PlanOpt = False,
    ) -> None:
        """Run every experiment; writes OUT/report.html, OUT/claims.json and OUT/study_numbers.csv."""
        from batchlab.atomic import atomic_write
        from batchlab.experiments import MLPOnly, available, findings, run_experiment
        from batchlab.experiments.options import parse_pairs, split_options
        from batchlab.experiments.outputs import claims_json
        from batchlab.report import write_report
        from batchlab.runs.store import Store

        names = [n.value for n in only] if only else [n for n in REPRODUCE_ORDER if n in available()]
        per_exp = split_options(parse_pairs(option), names)
        out, store = common.out, common.store
        resolve_device(common.device)
        check_store_folder(store)
        _check_out(out, store, (*names, "claims.json", "study_numbers.csv", "report.html",
                                "verdicts.md"))
        all_claims: list[dict[str, Any]] = []
        numbers: list[Any] = []
        timings: dict[str, float] = {}
        cpu: dict[str, float] = {}  # CPU seconds of this process (all threads) per experiment
        failed: list[str] = []  # experiments whose every run failed
        with Store(store) as st:
            if plan:
                _print_plan([(n, _context(common, st, per_exp[n], quiet)) for n in names], as_json,
                            quiet)
                return
            for n in names:
                ctx = _context(common, st, per_exp[n], quiet)
                if not quiet:
                    err.print(f"[bold]== {n}[/]")
                t0, c0 = time.perf_counter(), time.process_time()
                try:
                    output, _ = run_experiment(n, ctx)
                except MLPOnly as e:  # with --model: run what applies, say what does not
                    err.print(f"  skipped: {escape(str(e))}", highlight=False)
                    continue
                timings[n] = time.perf_counter() - t0
                cpu[n] = time.process_time() - c0
                if (why := ctx.all_failed()) is not None:
                    failed.append(f"{n}: {why}")
                all_claims += [{"experiment": n, **c.to_json()} for c in output.claims]
                numbers += output.study_numbers
                if not quiet:
                    print_claims(output.claims)
            warn_distrusted(st, quiet)
        out.mkdir(parents=True, exist_ok=True)
        atomic_write(out / "claims.json", claims_json(all_claims))
        atomic_write(out / "study_numbers.csv", findings.to_csv(findings.merge(numbers)))
        report = write_report(out, [n for n in names if n in timings], timings, preset=common.preset)
        if not quiet:
            err.print(f"wrote {escape(str(report))} ({sum(timings.values()):.0f}s)", highlight=False)
        if failed:
            raise AllRunsFailed("; ".join(failed))
        if as_json:
            doc = {"out": str(out), "report": str(report), "seconds": timings,
                   "cpu_seconds": cpu, "claims": all_claims}
            emit_json(None, _strict_json(doc))


def print_claims(claims: list[Any]) -> None:
    colors = {"reproduced": "green", "not_reproduced": "red", "inconclusive": "yellow"}
    for c in claims:
        tag = f"[{c.finding}] " if getattr(c, "finding", None) else ""
        err.print(f"  [{colors.get(c.verdict, 'white')}]{c.verdict:>15}[/]  {escape(tag)}{c.id}: "
                  f"{escape(c.claim)}", highlight=False)
