"""Experiments: each one a declaration (`Experiment`: its options, `units`, `analyze`) in a
module here with an `EXPERIMENT` object, run by `batchlab experiment NAME` and collected by
`batchlab reproduce`; one defined elsewhere joins with `register_experiment`, or from another
installed package through an entry point (`load_plugins`).

Data flows one way: the experiment declares its work (`units` -> `work.Work`: the configs to
train, the trials, curvature and timings after them) -> `ctx.run_many` trains the configs
through the store (resumable, local or Ray) -> `analyze` does the work that needs their results
and turns stored metrics into tables, figures and claims -> `write_outputs` puts
`results.csv`, `summary.md`, `claims.json` and PNGs in `OUT/NAME/` -> `report.py` assembles
`report.html`. `--plan` costs the same declaration without running it (`plan.py`).

Verdicts are computed from measurements by the one interval rule in `verdicts.py` (a `Claim`
in `claims.py` computes its verdict from its interval and region; nothing writes one by hand).
Options are typed per experiment in `options.py`.
"""

from __future__ import annotations

import dataclasses
import importlib
from pathlib import Path

from batchlab.errors import ConfigError
from batchlab.experiments.base import PRESETS, Context, Experiment, MLPOnly, Output
from batchlab.experiments.work import Curvature, Results, Trials, Work

# name -> module under batchlab.experiments (imported lazily); order = report order
REGISTRY: dict[str, str] = {
    "batch-size": "batch_size",
    "learning-rate": "learning_rate",
    "switch": "switch",
    "distance": "distance",
    "adam-vs-sgd": "adam_vs_sgd",
    "gradient-competition": "gradient_competition",
    "sharpness": "sharpness",
    "step-lengths": "step_lengths",
    "large-batch-fixes": "large_batch_fixes",
    "steps-to-target": "steps_to_target",
    "throughput": "throughput",
    "schedules": "schedules_exp",
}
_REGISTERED: dict[str, Experiment] = {}  # name -> declaration, by `register_experiment`
__all__ = ["PRESETS", "REGISTRY", "Context", "Curvature", "Experiment", "MLPOnly", "Output",
           "Results", "Trials", "Work", "available", "get", "load_plugins",
           "register_experiment", "run_experiment", "unregister_experiment"]


def register_experiment(exp: Experiment) -> Experiment:
    """Make `exp` an experiment of this process, beside the built-in ones: `get`,
    `run_experiment` and the planner find it by name, its typed options (`exp.options`, an
    `options.Options` subclass) are validated and resolved like theirs, and its findings
    (`exp.findings`: id -> title) join the checklist the report lists. One module holding the
    declaration is all a new experiment needs. Returns `exp` (usable as `EXPERIMENT =
    register_experiment(Experiment(...))`)."""
    from batchlab.experiments import findings
    from batchlab.experiments.options import OPTIONS, Options

    if not isinstance(exp, Experiment):
        raise ConfigError(f"register_experiment takes an Experiment, got {type(exp).__name__}")
    if exp.name in REGISTRY or exp.name in _REGISTERED:
        raise ConfigError(f"experiment {exp.name!r} is already registered")
    if exp.options is not None and not (isinstance(exp.options, type)
                                        and issubclass(exp.options, Options)):
        raise ConfigError(f"experiment {exp.name!r}: options must be an Options subclass")
    for fid, title in exp.findings.items():
        if findings.FINDINGS.get(fid, title) != title:
            raise ConfigError(f"experiment {exp.name!r}: finding {fid} is already "
                              f"{findings.FINDINGS[fid]!r}")
    if exp.options is not None:
        OPTIONS[exp.name] = exp.options
    for fid, title in exp.findings.items():
        findings.FINDINGS.setdefault(fid, title)
    _REGISTERED[exp.name] = exp
    return exp


def unregister_experiment(name: str) -> None:
    """Undo `register_experiment(name)` (its options and the findings it added go too)."""
    from batchlab.experiments import findings
    from batchlab.experiments.options import OPTIONS

    exp = _REGISTERED.pop(name, None)
    if exp is None:
        return
    OPTIONS.pop(name, None)
    for fid in exp.findings:
        findings.FINDINGS.pop(fid, None)


PLUGIN_GROUP = "batchlab.experiments"
"""Entry-point group of experiments defined in other installed packages: an entry point
`NAME = "module:EXPERIMENT"` (an `Experiment`) in a package's metadata, e.g. in its
pyproject.toml `[project.entry-points."batchlab.experiments"]`, makes `batchlab experiment
NAME` and `reproduce` run it without any change to batchlab."""


def load_plugins() -> list[str]:
    """Register every installed `PLUGIN_GROUP` experiment not registered yet; returns one line
    per entry point that could not be loaded (the CLI prints them and goes on without it:
    one broken package must not take every other experiment down)."""
    from importlib.metadata import entry_points

    problems = []
    for ep in entry_points(group=PLUGIN_GROUP):
        if ep.name in REGISTRY or ep.name in _REGISTERED:
            continue
        try:
            exp = ep.load()
            if not isinstance(exp, Experiment):
                raise ConfigError(f"{ep.value} is a {type(exp).__name__}, not an Experiment")
            if exp.name != ep.name:
                raise ConfigError(f"{ep.value} is named {exp.name!r}, its entry point {ep.name!r}")
            register_experiment(exp)
        except Exception as e:  # noqa: BLE001 - a plugin's failure, reported in one line
            problems.append(f"experiment plugin {ep.name!r} ({ep.value}) not loaded: "
                            f"{type(e).__name__}: {e}")
    return problems


def get(name: str) -> Experiment:
    if name in _REGISTERED:
        return _REGISTERED[name]
    if name not in REGISTRY:
        raise ConfigError(f"unknown experiment {name!r}; choose one of {', '.join(available())}")
    try:
        mod = importlib.import_module(f"batchlab.experiments.{REGISTRY[name]}")
    except ModuleNotFoundError as e:
        if e.name == f"batchlab.experiments.{REGISTRY[name]}":
            raise ConfigError(f"experiment {name!r} is not available in this version") from None
        raise
    return mod.EXPERIMENT


def available() -> list[str]:
    """Registered experiments whose module exists in this install."""
    import importlib.util

    return [*(n for n, m in REGISTRY.items()
              if importlib.util.find_spec(f"batchlab.experiments.{m}") is not None),
            *_REGISTERED]


def prepared(name: str, ctx: Context) -> Context:
    """`ctx` as experiment `name` reads it: `options` the user's (with the experiment's
    quick-preset defaults under them) validated, `opts` those typed and resolved for the preset
    (every unset field at its declared default). `run_experiment` and the planner both start
    from it, so a plan and a run see the same values."""
    from batchlab.experiments.options import validate

    opts = validate(name, get(name).options_for(ctx))
    return dataclasses.replace(ctx, options=opts.model_dump(exclude_none=True),
                               opts=opts.resolve(ctx.preset))


def run_experiment(name: str, ctx: Context) -> tuple[Output, Path]:
    """Run one experiment and write its outputs to `ctx.out_dir/name`."""
    from batchlab.experiments.outputs import write_outputs

    if ctx.preset not in PRESETS:
        raise ConfigError(f"unknown preset {ctx.preset!r}; use quick or paper")
    if ctx.seeds < 1:
        raise ConfigError("--seeds must be at least 1")
    exp = get(name)
    if exp.mlp_only:
        ctx.require_mlp(exp.mlp_only)
    ctx = prepared(name, ctx)
    output = exp.run(ctx)
    path = write_outputs(exp, output, ctx.out(name))
    return output, path
