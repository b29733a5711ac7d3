"""Typed `--set KEY=VALUE` options of every experiment, in one place.

Each experiment has a pydantic model here (`OPTIONS[name]`). Values arrive as JSON
(`--set trials=8`, `--set 'batch_sizes=[64,1024]'`; a bare word is a string, and a list may
also be written `64,1024`). Unknown keys and wrong types are one-line `ConfigError`s naming
the key; the same option has the same type in every experiment (`batch_sizes` is always a
list of positive integers). A field left at None means "the preset's default", which the
experiment resolves and reports in its summary. `batchlab experiment options NAME` prints the
table `describe(name)` returns.
"""

from __future__ import annotations

import json
import re
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, PositiveFloat, PositiveInt, ValidationError

from batchlab.errors import ConfigError


def _listish(v: Any) -> Any:
    """Accept `64,1024` (a string from the shell) as well as a JSON list or one number."""
    if isinstance(v, str):
        parts = [p.strip() for p in v.split(",") if p.strip()]
        out = []
        for p in parts:
            try:
                out.append(json.loads(p))
            except json.JSONDecodeError:
                out.append(p)
        return out
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        return [v]
    return v


Ints = Annotated[list[PositiveInt], BeforeValidator(_listish), Field(min_length=1)]
Floats = Annotated[list[PositiveFloat], BeforeValidator(_listish), Field(min_length=1)]


def opt(description: str, default: Any = None, **kw: Any) -> Any:
    return Field(default=default, description=description, **kw)


class Options(BaseModel):
    """Base of every experiment's options: unknown keys are errors, 2.9 is not an int. The
    fields here apply to every config an experiment trains (`Context.config`)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    hidden: Ints | None = opt("hidden layer widths of the built-in MLP (default [1024, 1024])")
    dataset: str | None = opt("dataset name (default: mnist-5k quick, mnist paper)")
    max_train: PositiveInt | None = opt("use at most this many training examples (stratified)")
    train_eval_size: PositiveInt | None = opt(
        "score the per-epoch train metrics on a stratified subset of this many training "
        "examples (default: all quick, 10000 paper: a third less evaluation on mnist-24k, "
        "train accuracy to a standard error <= 0.005)")


GENERIC = ("hidden", "dataset", "max_train", "train_eval_size")
PAPER_TRAIN_EVAL = 10_000
"""The paper preset's train-evaluation subset (`TrainConfig.train_eval_size`): every epoch
evaluates the train and test sets, 34,000 examples on mnist-24k against 24,000 trained - a third
of a run's FLOPs. 10,000 fixed examples (the same in every arm and epoch, so comparisons stay
paired) give train accuracy to a binomial standard error of at most 0.005, a tenth of the
0.05 'has learned' gate and equal to the plateau tolerance only at 50 % accuracy, where no
converged arm sits."""


class StudyOptions(Options):
    """Options every experiment of the MNIST study accepts."""

    epochs: PositiveInt | None = opt("epochs E per run (default: 10 quick, 30 paper)", le=100_000)


class BatchSize(StudyOptions):
    batch_sizes: Ints | None = opt("batch sizes at lr 0.01 (default [64, 256, 1024]; paper adds 2)")


class LearningRate(StudyOptions):
    batch_sizes: Ints | None = opt("small and large batch (default [64, 1024])")
    large_lr: PositiveFloat | None = opt("lr of the large batch (default 0.1)")


class Switch(StudyOptions):
    batch_sizes: Ints | None = opt("small and large batch (default [64, 1024])")


class Distance(StudyOptions):
    batch_sizes: Ints | None = opt("batch sizes of the W/B/A grid (default [64, 1024])")
    lrs: Floats | None = opt("learning rates of the grid (default [0.01, 0.1])")
    long_epochs: PositiveInt | None = opt("epochs of the long large-batch run (default: steps-matched)")


class AdamVsSgd(StudyOptions):
    batch_size: PositiveInt | None = opt("batch size of both optimizers (default 64)")
    adam_lr: PositiveFloat | None = opt("Adam's lr (default 0.01, the study's)")


class GradientCompetition(Options):
    trials: int | None = opt("trials per batch size and checkpoint seed (default 3 quick, 64 paper)", ge=2)
    batch_sizes: Ints | None = opt("batch sizes b (default 1..8, 16..1024)")
    n_samples: PositiveInt | None = opt("samples per trial (default 1024)")
    early_epochs: PositiveInt | None = opt("epoch of the early checkpoint (default 2)")
    late_epochs: PositiveInt | None = opt("epoch of the late checkpoint (default 10 quick, 30 paper)")
    late_batch_size: PositiveInt | None = opt("batch size after the early checkpoint (default 1024)")
    lr: PositiveFloat | None = opt("lr of the trials (default 0.01)")
    modes: Annotated[list[Literal["displacement", "sample-sum", "sum-loss"]], BeforeValidator(_listish)] | None = \
        opt("readings of the summed gradient (default: all three)")
    keep_tensors: bool | None = opt("keep per-trial gradient tensors as .npy (default true)")
    same_samples: bool | None = opt("every batch size sees the same samples (default false)")
    k: PositiveInt | None = opt("trials stacked per batched matmul (default: device's)")
    threads: PositiveInt | None = opt("parallel single-threaded workers (default: torch threads)")
    chunk: PositiveInt | None = opt("trials per task and stored chunk (default 16)")
    engine: Literal["fused", "deferred"] | None = opt("trial engine (default: deferred on CPU)")
    blowup_loss: PositiveFloat | None = opt("a trial whose loss exceeds this is flagged (default 100)")
    seed: int | None = opt("seed of the trials (default 0)", ge=0, lt=2**63)
    checkpoint_early: str | None = opt("safetensors file to use as the early checkpoint")
    checkpoint_late: str | None = opt("safetensors file to use as the late checkpoint")
    tensor_dir: str | None = opt("where kept tensors go (default OUT/gradient-competition/tensors)")
    hidden: Ints | None = opt("hidden widths (default [1024, 1024], the study's)")
    decomp_sets: int | None = opt("sample sets of the decomposition per checkpoint (default 3 quick, 4 paper)", ge=2)
    decomp_orders: int | None = opt("orders per set of the decomposition (default 2 quick, 5 paper)", ge=2)
    decomp_batch_sizes: Ints | None = opt("batch sizes of the decomposition")


class Sharpness(Options):
    epochs: PositiveInt | None = opt("epochs of the small-batch run (default 8 quick, 30 paper)", le=100_000)
    lr: PositiveFloat | None = opt("lr of both runs (default 0.01)")
    large_epochs: PositiveInt | None = opt("epochs of the large-batch run (default 3 x epochs)", le=100_000)
    curvature_samples: PositiveInt | None = opt("examples for curvature (default 1000 quick, 10000 paper)")
    trace_samples: PositiveInt | None = opt("Hutchinson probes (default 8 quick, 50 paper)")
    slq_steps: PositiveInt | None = opt("Lanczos steps of the spectral density (default 20 quick, 60 paper)")
    subspace_dim: PositiveInt | None = opt("dimension of Keskar's random subspace (default 100)")
    k7_samples: PositiveInt | None = opt("K7: training examples of the full-batch lr sweep and its "
                                         "lambda_max (default 1024 quick, 4096 paper)")
    k7_steps: PositiveInt | None = opt("K7: GD steps per lr of the sweep to divergence (default 20 "
                                       "quick, 50 paper)", le=100_000)


class StepLengths(Options):
    batch_sizes: Ints | None = opt("batch sizes (default [64, 256, 1024]; paper adds 4096)")
    epochs: PositiveInt | None = opt("epochs (default 4 quick, 20 paper)", le=100_000)
    lr: PositiveFloat | None = opt("lr (default 0.01)")


class LargeBatchFixes(Options):
    batch_size: PositiveInt | None = opt("the large batch (default 1000 quick, 4096 paper)")
    epochs: PositiveInt | None = opt("epochs (default 10 quick, 30 paper)", le=100_000)
    base_lr: PositiveFloat | None = opt("lr of batch 64 that scaling starts from (default 0.01)")
    trust: PositiveFloat | None = opt("LARS trust coefficient (default 0.002)")
    lars_lr: PositiveFloat | None = opt("LARS global lr (default 0.01 / trust)")
    curvature_every: PositiveInt | None = opt("CBLR curvature refresh interval in steps (default 10)")
    discard: float | None = opt("fraction of lowest-loss samples discarded (default 0.2)", ge=0, lt=1)


class StepsToTarget(Options):
    batch_sizes: Ints | None = opt("batch sizes (default [16, 64, 256, 1024] quick, [16, 64, 256, 1024, 4096] paper)")
    lrs: Floats | None = opt("lr grid tuned per batch size (default [0.03, 0.1, 0.3, 1.0] quick)")
    max_epochs: PositiveInt | None = opt("epoch budget per run (default 15 quick, 60 paper)", le=100_000)
    target_metric: Literal["test_acc", "train_loss", "train_acc", "val_acc"] | None = opt("metric of the target")
    target_value: float | None = opt("value of the target (default 0.90 quick, 0.97 paper)", allow_inf_nan=False)
    momentum: float | None = opt("momentum (default 0)", ge=0, lt=1)
    fine_steps: bool | None = opt("resolve the step a target is hit within an epoch (default true)")
    tiny_batch: PositiveInt | None = opt("the too-small batch of P3, run over the lr grid (default 1)")
    tiny_epochs: PositiveInt | None = opt("epoch budget of the tiny batch (default 2 quick, 5 paper)", le=100_000)
    lr_search: Literal["grid", "halving"] | None = opt(
        "lr tuning per batch size: the full grid, or successive halving that stops lrs which can "
        "no longer be fastest to the target (default grid quick, halving paper)")


class Throughput(StepsToTarget):
    pass


class Schedules(Options):
    base_batch: PositiveInt | None = opt("the small batch of the recipe (default 128)")
    large_batch: PositiveInt | None = opt("the large batch (default 512 quick, 1024 paper)")
    lr: PositiveFloat | None = opt("lr of the small-batch recipe (default 0.1)")
    epochs: PositiveInt | None = opt("epochs (default 10 quick, 30 paper)", le=100_000)
    decay_epochs: Ints | None = opt("epochs of the step decays (default [5, 8] quick)")
    decay_factor: float | None = opt("factor of each decay (default 0.1)", gt=0, lt=1)
    warmup_epochs: float | None = opt("Goyal warmup epochs (default 1 quick, 2 paper)", ge=0, le=1000)
    tolerance: float | None = opt("accuracy tolerance of 'closes the gap' (default 0.01)", gt=0, lt=1)
    gbn: bool | None = opt("also run the BatchNorm arms (default true)")


OPTIONS: dict[str, type[Options]] = {
    "batch-size": BatchSize,
    "learning-rate": LearningRate,
    "switch": Switch,
    "distance": Distance,
    "adam-vs-sgd": AdamVsSgd,
    "gradient-competition": GradientCompetition,
    "sharpness": Sharpness,
    "step-lengths": StepLengths,
    "large-batch-fixes": LargeBatchFixes,
    "steps-to-target": StepsToTarget,
    "throughput": Throughput,
    "schedules": Schedules,
}


def parse_pairs(items: list[str] | None) -> dict[str, Any]:
    """`KEY=VALUE` strings -> dict (values JSON-decoded; a bare word stays a string)."""
    out: dict[str, Any] = {}
    for it in items or []:
        if "=" not in it:
            raise ConfigError(f"--set expects KEY=VALUE, got {it!r}")
        k, v = it.split("=", 1)
        k = k.strip()
        if not k:
            raise ConfigError(f"--set expects KEY=VALUE, got {it!r}")
        if k in out:  # the last one silently winning hides a typo in a long command line
            raise ConfigError(f"--set {k} is given twice; keep one")
        try:
            out[k] = json.loads(v)
        except json.JSONDecodeError:
            out[k] = v
    return out


def _has_bool(v: Any) -> bool:
    return isinstance(v, bool) or (isinstance(v, list) and any(isinstance(x, bool) for x in v))


def validate(name: str, raw: dict[str, Any]) -> Options:
    """The typed options of experiment `name`, or a one-line ConfigError naming the key."""
    model = OPTIONS.get(name, Options)
    unknown = sorted(set(raw) - set(model.model_fields))
    if unknown:
        known = ", ".join(sorted(model.model_fields)) or "none"
        raise ConfigError(f"unknown option {unknown[0]!r} for experiment {name}; known: {known}")
    for k, v in raw.items():  # pydantic reads true as 1: `epochs=true` would run one epoch
        ann = str(model.model_fields[k].annotation)
        if _has_bool(v) and "bool" not in ann:
            what = "a number" if ("int" in ann or "float" in ann) else "a word"
            raise ConfigError(f"option {k} of experiment {name}: {what} is expected, got "
                              f"{json.dumps(v)}")
    try:
        return model(**raw)
    except ValidationError as e:
        err = e.errors()[0]
        key = ".".join(str(p) for p in err["loc"]) or "?"
        msg = err["msg"].removeprefix("Value error, ")
        raise ConfigError(f"option {key} of experiment {name}: {msg} (got {err.get('input')!r})") from None


def split_options(raw: dict[str, Any], names: list[str]) -> dict[str, dict[str, Any]]:
    """`reproduce --set`: `NAME.KEY` goes to experiment NAME, a plain `KEY` to every experiment
    among `names` that has an option KEY (an error if none has). Each part is validated."""
    out: dict[str, dict[str, Any]] = {n: {} for n in names}
    for key, value in raw.items():
        name, dot, k = key.partition(".")
        if dot:
            if name not in out:
                raise ConfigError(f"--set {key}: {name!r} is not among the experiments to run")
            out[name][k] = value
            continue
        takers = [n for n in names if key in OPTIONS.get(n, Options).model_fields]
        if not takers:
            raise ConfigError(f"--set {key}: no experiment to run has an option {key!r}")
        for n in takers:
            out[n][key] = value
    for n, opts in out.items():
        validate(n, opts)
    return out


def describe(name: str) -> list[dict[str, str]]:
    """One row per option: name, type, default, meaning (the default is quoted from the
    description's "(default ...)", since None means "the preset decides")."""
    model = OPTIONS.get(name, Options)
    rows = []
    for key, f in model.model_fields.items():
        desc = f.description or ""
        m = re.search(r"\(default:? ([^)]*)\)", desc)
        rows.append({"option": key, "type": type_name(f.annotation, f.metadata),
                     "default": m.group(1) if m else "none",
                     "meaning": re.sub(r"\s*\(default:? [^)]*\)", "", desc)})
    return rows


def type_name(ann: Any, metadata: list[Any] | None = None) -> str:
    """A short human name of an option's type."""
    s = str(ann)
    bounds = " ".join(str(m) for m in metadata or [])
    if "list[" in s:
        inner = s.split("list[", 1)[1]
        if inner.startswith("typing.Literal") or inner.startswith("Literal"):
            return "list of " + inner.split("[", 1)[1].split("]", 1)[0].replace("'", "")
        kind = "int" if inner.startswith("typing.Annotated[int") or inner.startswith("int") else "float"
        return f"list of positive {kind}s" if "Gt(gt=0)" in inner else f"list of {kind}s"
    if "Literal[" in s:
        return "one of " + s.split("Literal[", 1)[1].split("]", 1)[0].replace("'", "")
    for t in ("bool", "int", "float", "str"):
        if re.search(rf"\b{t}\b", s):
            pos = "Gt(gt=0)" in s or "gt=0" in bounds
            bounds = bounds.replace("Ge(ge=", ">= ").replace("Le(le=", "<= ").replace("Lt(lt=", "< ")
            extra = f" ({bounds.replace(')', '')})" if bounds and not pos else ""
            return (f"positive {t}" if pos else t) + extra
    return s
