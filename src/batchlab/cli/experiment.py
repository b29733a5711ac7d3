"""`batchlab experiment NAME` and `batchlab reproduce`."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console

err = Console(stderr=True)


def register(app: typer.Typer) -> None:
    @app.command()
    def experiment(
        name: Annotated[str, typer.Argument(help="Experiment name (see `batchlab experiment list`).")],
        preset: Annotated[str, typer.Option(help="quick (CPU minutes) or paper (the study's settings).")] = "quick",
        seeds: Annotated[int, typer.Option(help="Seeds per configuration (mean and spread reported).")] = 1,
        data_dir: Annotated[Optional[str], typer.Option("--data-dir")] = None,
        out: Annotated[Path, typer.Option("--out", help="Output directory.")] = Path("out"),
        store: Annotated[Path, typer.Option("--store")] = Path("batchlab.db"),
        executor: Annotated[str, typer.Option(help="local or ray.")] = "local",
        ray_address: Annotated[Optional[str], typer.Option("--ray-address")] = None,
        device: Annotated[str, typer.Option()] = "auto",
        option: Annotated[Optional[list[str]], typer.Option("--set", help="Experiment option KEY=VALUE (repeatable).")] = None,
        plan: Annotated[bool, typer.Option("--plan", help="Print what would run (minus what is stored), steps, FLOPs, memory, disk and projected time; train nothing.")] = False,
        as_json: Annotated[bool, typer.Option("--json", help="With --plan: one JSON object on stdout.")] = False,
    ) -> None:
        """Run one experiment; writes OUT/NAME/ (figures, results.csv, summary.md, claims.json)."""
        from batchlab.cli.progress import ProgressBars
        from batchlab.experiments import Context, available, run_experiment
        from batchlab.runs.store import Store

        if name == "list":
            for n in available():
                typer.echo(n)
            return
        with Store(store) as st:
            ctx = Context(preset=preset, seeds=seeds, data_dir=data_dir, out_dir=out, store=st,
                          executor=executor, ray_address=ray_address, device=device,
                          options=_parse_options(option), progress=ProgressBars(err))
            if plan:
                from batchlab.experiments.plan import print_plan

                print_plan([name], ctx, as_json)
                return
            t0 = time.perf_counter()
            output, path = run_experiment(name, ctx)
        _print_claims(output.claims)
        err.print(f"wrote {path} in {time.perf_counter() - t0:.0f}s")

    @app.command()
    def reproduce(
        preset: Annotated[str, typer.Option(help="quick or paper.")] = "quick",
        seeds: Annotated[int, typer.Option()] = 1,
        data_dir: Annotated[Optional[str], typer.Option("--data-dir")] = None,
        out: Annotated[Path, typer.Option("--out")] = Path("out"),
        store: Annotated[Path, typer.Option("--store")] = Path("batchlab.db"),
        executor: Annotated[str, typer.Option()] = "local",
        ray_address: Annotated[Optional[str], typer.Option("--ray-address")] = None,
        device: Annotated[str, typer.Option()] = "auto",
        only: Annotated[Optional[list[str]], typer.Option("--only", help="Run just these experiments.")] = None,
        plan: Annotated[bool, typer.Option("--plan", help="Print what would run (minus what is stored), steps, FLOPs, memory, disk and projected time; train nothing.")] = False,
        as_json: Annotated[bool, typer.Option("--json", help="With --plan: one JSON object on stdout.")] = False,
    ) -> None:
        """Run every experiment and write OUT/report.html and OUT/claims.json."""
        from batchlab.cli.progress import ProgressBars
        from batchlab.experiments import Context, available, run_experiment
        from batchlab.experiments.outputs import atomic_write
        from batchlab.report import write_report
        from batchlab.runs.store import Store

        names = only or [n for n in available() if n in REPRODUCE_ORDER]
        all_claims = []
        timings = {}
        with Store(store) as st:
            ctx = Context(preset=preset, seeds=seeds, data_dir=data_dir, out_dir=out, store=st,
                          executor=executor, ray_address=ray_address, device=device,
                          progress=ProgressBars(err))
            if plan:
                from batchlab.experiments.plan import print_plan

                print_plan(names, ctx, as_json)
                return
            for n in names:
                err.print(f"[bold]== {n}[/]")
                t0 = time.perf_counter()
                output, _ = run_experiment(n, ctx)
                timings[n] = time.perf_counter() - t0
                all_claims += [{"experiment": n, **c.to_json()} for c in output.claims]
                _print_claims(output.claims)
        out.mkdir(parents=True, exist_ok=True)
        atomic_write(out / "claims.json", json.dumps(all_claims, indent=2, default=float))
        report = write_report(out, names, timings, preset=preset)
        err.print(f"wrote {report} ({sum(timings.values()):.0f}s)")


# experiments `reproduce` runs by default (the MNIST study and, as they land, the others)
REPRODUCE_ORDER = ("batch-size", "learning-rate", "switch", "distance", "adam-vs-sgd",
                   "gradient-competition", "sharpness", "large-batch-fixes", "steps-to-target",
                   "schedules")


def _parse_options(items: list[str] | None) -> dict:
    from batchlab.errors import ConfigError

    opts = {}
    for it in items or []:
        if "=" not in it:
            raise ConfigError(f"--set expects KEY=VALUE, got {it!r}")
        k, v = it.split("=", 1)
        try:
            opts[k] = json.loads(v)
        except json.JSONDecodeError:
            opts[k] = v
    return opts


def _print_claims(claims) -> None:
    colors = {"reproduced": "green", "not_reproduced": "red", "inconclusive": "yellow"}
    for c in claims:
        err.print(f"  [{colors.get(c.verdict, 'white')}]{c.verdict:>15}[/]  {c.id}: {c.claim}")
