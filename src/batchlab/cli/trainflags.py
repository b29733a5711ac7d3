"""`batchlab train` flags for TrainConfig's scalar fields that have no hand-written flag.

Why generated: a scalar field added to TrainConfig used to be reachable from the command line
only through `--config`, and nobody noticed which ones were missing. Here each scalar field gets
`--field-name` with the field's own type (a Literal becomes a choice), its default and a help
line from FIELD_HELP; a field without one makes the CLI fail to import (and the tests fail), so
a new field cannot slip past. List-, tuple- and dict-valued fields (`hidden`, `betas`,
`schedule`, ...) stay in the `--config` TOML, where their syntax is TOML's.
"""

from __future__ import annotations

import functools
import inspect
import types
import typing
from collections.abc import Callable
from typing import Annotated, Any, Literal, Optional

import typer

from batchlab.config import TrainConfig

SCALARS = (int, float, bool, str)

# help for the generated flags (hand-written flags carry their own in cli/options.py)
FIELD_HELP: dict[str, str] = {
    "normalize": "Input scaling: unit divides images by 255, standardize subtracts the training mean and divides by its std.",
    "val_fraction": "Part of the training set held out (seeded) as a validation split, in [0, 1).",
    "max_train": "Use a fixed stratified subset of this many training examples.",
    "max_test": "Use a fixed stratified subset of this many test examples.",
    "train_eval_size": "Score the per-epoch train metrics on a fixed stratified subset of this many training examples (training uses all; 0: no train metrics).",
    "eval_every": "Evaluate every k-th epoch (always epoch 0, the last and checkpoint epochs); not with a target.",
    "batchnorm": "Batch normalization after each hidden layer of the built-in models.",
    "ghost_batch_size": "Batch-norm statistics per chunk of this many examples (ghost batch norm).",
    "nesterov": "Nesterov momentum (sgd, needs --momentum > 0).",
    "eps": "Adam/AdamW epsilon (> 0).",
    "trust_coefficient": "LARS trust coefficient eta (> 0).",
    "curvature_every": "Steps between curvature measurements of cblr/mclr.",
    "discard_fraction": "Drop this lowest-loss fraction of each batch before the update, in [0, 1).",
    "warmup_epochs": "Linear lr warmup length in epochs (0: none; the goyal recipe's warmup on schedule-preset).",
    "decay": "lr decay after warmup: none, step (at decay_epochs, set in --config) or cosine.",
    "decay_factor": "Factor of each step decay (> 0).",
    "target_metric": "Stop when this metric reaches --target-value.",
    "target_value": "Value of --target-metric at which training stops.",
    "engine": "auto (fused where it applies), autograd, or fused (batchlab's manual-backward SGD path for MLPs).",
}


def _scalar(annotation: Any) -> Any | None:
    """The annotation as a typer option type if the field is a single scalar or a choice of
    scalars (optionally None); None for lists, tuples, dicts and models."""
    args = typing.get_args(annotation)
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        rest = [a for a in args if a is not type(None)]
        return _scalar(rest[0]) if len(rest) == 1 else None
    if typing.get_origin(annotation) is Literal:
        return annotation if all(isinstance(a, SCALARS) for a in args) else None
    return annotation if annotation in SCALARS else None


def scalar_fields() -> dict[str, Any]:
    """TrainConfig's scalar fields and their option types."""
    found = {n: _scalar(f.annotation) for n, f in TrainConfig.model_fields.items()}
    return {n: t for n, t in found.items() if t is not None}


def with_config_flags(fn: Callable[..., None]) -> Callable[..., None]:
    """`fn(ctx, ..., extra=dict)` as a typer command that also takes a flag for every scalar
    TrainConfig field fn does not declare itself; `extra` holds the ones given explicitly (a
    flag left out keeps the --config value or the field's default)."""
    sig = inspect.signature(fn, eval_str=True)
    own = [p for p in sig.parameters.values() if p.name != "extra"]
    generated = {n: t for n, t in scalar_fields().items() if n not in sig.parameters}
    missing = sorted(set(generated) - set(FIELD_HELP))
    if missing:
        raise RuntimeError(f"TrainConfig fields without a train flag help text: {missing}")
    params = []
    for name, ann in generated.items():
        flag = "--" + name.replace("_", "-")
        if ann is bool:
            info = typer.Option(f"{flag}/--no-{flag[2:]}", help=FIELD_HELP[name], metavar="")
        else:
            info = typer.Option(flag, help=FIELD_HELP[name])
        default = TrainConfig.model_fields[name].default
        params.append(inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default,
                                        annotation=Annotated[Optional[ann], info]))

    @functools.wraps(fn)
    def command(**kw: Any) -> None:
        ctx = kw["ctx"]
        extra = {n: kw.pop(n) for n in generated}
        fn(**kw, extra={n: v for n, v in extra.items() if given(ctx, n)})

    del command.__wrapped__  # typer must read the signature below, not fn's
    command.__signature__ = inspect.Signature(  # type: ignore[attr-defined]
        [*own, *params])
    command.__annotations__ = {}
    return command


def given(ctx: Any, name: str) -> bool:
    """Whether flag `name` was given on the command line (not a default)."""
    src = ctx.get_parameter_source(name)
    return src is not None and src.name not in ("DEFAULT", "DEFAULT_MAP")
