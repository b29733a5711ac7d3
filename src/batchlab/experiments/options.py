"""Typed `--set KEY=VALUE` options of every experiment, in one place.

Each experiment has a pydantic model here (`OPTIONS[name]`). Values arrive as JSON
(`--set trials=8`, `--set 'batch_sizes=[64,1024]'`; a bare word is a string, and a list may
also be written `64,1024`). Unknown keys and wrong types are one-line `ConfigError`s naming
the key; the same option has the same type in every experiment (`batch_sizes` is always a
list of positive integers).

Each field declares its default next to its type: one value for both presets, `preset(quick,
paper)` where the presets differ, `derived(fn, text)` where it follows from other options
(`large_epochs` = 3 x `epochs`), or `unset(text)` where None itself means something the
experiment decides at run time (the device's worker count). The field's pydantic default stays
None, so a validated model holds only what the user set (`ctx.options`); `Options.resolve(preset)`
fills every unset field from its declaration, and that resolved instance is what an experiment
reads (`Context.opts`). Why: the declaration is the one place a default lives - the module
reads it, the planner reads it, and `describe` (the `batchlab experiment options NAME` table)
renders it, so the three cannot disagree.
"""

from __future__ import annotations

import json
import re
from types import SimpleNamespace
from typing import Annotated, Any, Literal, Self

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, PositiveFloat, PositiveInt, ValidationError

from batchlab.errors import ConfigError
from batchlab.experiments.option_defaults import (
    Derived,
    Preset,
    Unset,
    declared,
    default_text,
    derived,
    opt,
    preset,
    unset,
)


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


class Options(BaseModel):
    """Base of every experiment's options: unknown keys are errors, 2.9 is not an int. The
    fields here apply to every config an experiment trains (`Context.config`)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    def resolve(self, preset_name: str) -> Self:
        """This model with every field the user left unset filled from its declared default
        for `preset_name` (derived ones after the others); `unset` fields and fields without
        a default stay None. The filled values pass the same validation as the user's."""
        fields = type(self).model_fields
        vals = {k: getattr(self, k) for k in fields}
        later = []
        for k, f in fields.items():
            if vals[k] is not None:
                continue
            d = declared(f)
            if isinstance(d, Preset):
                vals[k] = d.value(preset_name)
            elif isinstance(d, Derived):
                later.append((k, d))
            elif not isinstance(d, Unset):
                vals[k] = d
        for k, d in later:
            vals[k] = d.fn(SimpleNamespace(**vals))
        return type(self).model_validate(vals)

    hidden: Ints | None = opt("hidden layer widths of the built-in MLP",
                              unset("[1024, 1024]; [256, 256] quick outside the study"))
    dataset: str | None = opt("dataset name", unset("mnist-5k quick, mnist paper or with --data-dir"))
    max_train: PositiveInt | None = opt("use at most this many training examples (stratified)")
    train_eval_size: PositiveInt | None = opt(
        "score the per-epoch train metrics on a stratified subset of this many training "
        "examples (paper: a third less evaluation on mnist-24k, train accuracy to a standard "
        "error <= 0.005)", unset("all quick, 10000 paper"))


GENERIC = ("hidden", "dataset", "max_train", "train_eval_size")
PAPER_TRAIN_EVAL = 10_000
"""The paper preset's train-evaluation subset (`TrainConfig.train_eval_size`): every epoch
evaluates the train and test sets, 34,000 examples on mnist-24k against 24,000 trained - a third
of a run's FLOPs. 10,000 fixed examples (the same in every arm and epoch, so comparisons stay
paired) give train accuracy to a binomial standard error of at most 0.005, a tenth of the
0.05 'has learned' gate and equal to the plateau tolerance only at 50 % accuracy, where no
converged arm sits."""

GC_BATCH_SIZES = [1, 2, 3, 4, 5, 6, 7, 8, 16, 32, 64, 128, 256, 512, 1024]
"""Gradient competition's batch sizes b (`batchlab.analysis.gradcomp.BATCH_SIZES`; a test
keeps the two equal - importing it here would pull torch into option parsing)."""
GC_MODES = ["displacement", "sample-sum", "sum-loss"]


class StudyOptions(Options):
    """Options every experiment of the MNIST study accepts."""

    epochs: PositiveInt | None = opt("epochs E per run", preset(5, 30), le=100_000)


class BatchSize(StudyOptions):
    batch_sizes: Ints | None = opt("batch sizes at lr 0.01", preset([64, 256, 1024], [2, 64, 256, 1024]))


class LearningRate(StudyOptions):
    batch_sizes: Ints | None = opt("small and large batch", [64, 1024])
    large_lr: PositiveFloat | None = opt("lr of the large batch", 0.1)


class Switch(StudyOptions):
    batch_sizes: Ints | None = opt("small and large batch", [64, 1024])


class Distance(StudyOptions):
    # The quick preset's grid: batch 256 stands in for the study's 1024, because the
    # steps-matched long run (large / small x E epochs) is most of the cost: at 1024 it would be
    # 16 x E epochs per seed, 55% of the five study experiments' quick budget; at 256 it is 4 x E.
    batch_sizes: Ints | None = opt("batch sizes of the W/B/A grid",
                                   preset([64, 256], [64, 128, 256, 512, 1024]))
    lrs: Floats | None = opt("learning rates of the grid", preset([0.01, 0.1], [0.01, 0.03, 0.1, 0.3]))
    long_epochs: PositiveInt | None = opt(
        "epochs of the long large-batch run",
        derived(lambda o: (max(o.batch_sizes) // min(o.batch_sizes)) * o.epochs,
                "steps-matched: (largest / smallest batch) x epochs"))


class AdamVsSgd(StudyOptions):
    batch_size: PositiveInt | None = opt("batch size of both optimizers", 64)
    adam_lr: PositiveFloat | None = opt("Adam's lr (the study's)", 0.01)


class GradientCompetition(Options):
    # trials and decomposition cells are PER CHECKPOINT (one per training seed); see the
    # resolution argument in gradient_competition's docstring. quick: mnist-5k, CPU minutes.
    trials: int | None = opt("trials per batch size and checkpoint seed", preset(3, 64), ge=2)
    batch_sizes: Ints | None = opt("batch sizes b", GC_BATCH_SIZES)
    n_samples: PositiveInt | None = opt("samples per trial", 1024)
    early_epochs: PositiveInt | None = opt("epoch of the early checkpoint", 2)
    late_epochs: PositiveInt | None = opt("epoch of the late checkpoint", preset(10, 30))
    late_batch_size: PositiveInt | None = opt("batch size after the early checkpoint", 1024)
    lr: PositiveFloat | None = opt("lr of the trials", 0.01)
    modes: Annotated[list[Literal["displacement", "sample-sum", "sum-loss"]], BeforeValidator(_listish)] | None = \
        opt("readings of the summed gradient", GC_MODES)
    keep_tensors: bool | None = opt("keep per-trial gradient tensors as .npy", True)
    same_samples: bool | None = opt("every batch size sees the same samples", False)
    k: PositiveInt | None = opt("trials stacked per batched matmul", unset("the device's"))
    threads: PositiveInt | None = opt("parallel single-threaded workers", unset("torch threads"))
    chunk: PositiveInt | None = opt("trials per task and stored chunk", unset("16, rounded up to a multiple of k"))
    engine: Literal["fused", "deferred"] | None = opt("trial backend (step kernel)", unset("deferred on CPU"))
    blowup_loss: PositiveFloat | None = opt("a trial whose loss exceeds this is flagged", 100.0)
    seed: int | None = opt("seed of the trials", 0, ge=0, lt=2**63)
    checkpoint_early: str | None = opt("safetensors file to use as the early checkpoint")
    checkpoint_late: str | None = opt("safetensors file to use as the late checkpoint")
    tensor_dir: str | None = opt("where kept tensors go", unset("OUT/gradient-competition/tensors"))
    hidden: Ints | None = opt("hidden widths (the study's)", [1024, 1024])
    decomp_sets: int | None = opt("sample sets of the decomposition per checkpoint", preset(3, 4), ge=2)
    decomp_orders: int | None = opt("orders per set of the decomposition", preset(2, 5), ge=2)
    decomp_batch_sizes: Ints | None = opt("batch sizes of the decomposition",
                                          preset([1, 8, 64, 1024], GC_BATCH_SIZES))


class Sharpness(Options):
    epochs: PositiveInt | None = opt("epochs of the small-batch run", preset(8, 30), le=100_000)
    lr: PositiveFloat | None = opt("lr of both runs", 0.01)
    large_epochs: PositiveInt | None = opt("epochs of the large-batch run",
                                           derived(lambda o: 3 * o.epochs, "3 x epochs"), le=100_000)
    # Not cut to 4,096 (issue 21 asked): the small-batch minimizer's lambda_max on the first 4,096
    # examples is 11-14% below that on the first 10,000 (seed 0: 3.46 vs 4.01, seed 1: 3.53 vs
    # 3.98), the large batch's moves <= 2% (14.91 vs 15.12), so K2's large/small ratio shifts by
    # +12-14% (4.31 vs 3.77, 4.41 vs 3.93), the same for every seed (the subsample is shared): a bias, not
    # noise. K2 (ratio ~3.8) would survive it, but K5 compares lambda_max of the switched run
    # (small-batch-like) with the large one, and its quick-preset interval [0.55, 1.03] ends 3%
    # from its boundary. (784-256-256-10 on mnist-24k, quick epochs: `python
    # benchmarks/curvature_samples.py --data-dir DIR --seeds 2 --samples 1000,4096,10000`.)
    curvature_samples: PositiveInt | None = opt("examples for curvature", preset(1000, 10_000))
    # Hutch++ to 7% took 32-64 products and reached +-2.2-5.0% (95%), where the old fixed 50
    # Hutchinson probes gave +-5.0-10.3% (784-256-256-10 on mnist-24k, small and large batch;
    # `benchmarks/curvature_samples.py --data-dir DIR --seeds 2`): Hutchinson would need 80-960
    # products for the accuracy reached. Both presets: 8 quick probes give +-12-26% there.
    trace_rtol: PositiveFloat | None = opt("trace: Hutch++ stops when its 95% interval is within "
                                           "this fraction of the estimate", 0.07, lt=1)
    slq_steps: PositiveInt | None = opt("Lanczos steps of the spectral density", preset(20, 60))
    subspace_dim: PositiveInt | None = opt("dimension of Keskar's random subspace", 100)
    k7_samples: PositiveInt | None = opt("K7: training examples of the full-batch lr sweep and its "
                                         "lambda_max", preset(1024, 4096))
    k7_steps: PositiveInt | None = opt("K7: GD steps per lr of the sweep to divergence",
                                       preset(20, 50), le=100_000)


class StepLengths(Options):
    batch_sizes: Ints | None = opt("batch sizes", preset([64, 256, 1024], [64, 256, 1024, 4096]))
    epochs: PositiveInt | None = opt("epochs", preset(4, 20), le=100_000)
    lr: PositiveFloat | None = opt("lr", 0.01)


class LargeBatchFixes(Options):
    batch_size: PositiveInt | None = opt("the large batch", preset(1000, 4096))
    epochs: PositiveInt | None = opt("epochs", preset(10, 30), le=100_000)
    base_lr: PositiveFloat | None = opt("lr of batch 64 that scaling starts from", 0.01)
    trust: PositiveFloat | None = opt("LARS trust coefficient", 0.002)
    lars_lr: PositiveFloat | None = opt("LARS global lr", derived(lambda o: 0.01 / o.trust, "0.01 / trust"))
    curvature_every: PositiveInt | None = opt("CBLR curvature refresh interval in steps", 10)
    discard: float | None = opt("fraction of lowest-loss samples discarded", 0.2, ge=0, lt=1)


class StepsToTarget(Options):
    # The paper grid steps by 4x, as the quick one does: S(B) = S_min + E_min/B has two
    # parameters and bends over about a decade of B around B_crit, so five points over 16..4096
    # (2.4 decades) still sample both the perfect-scaling and the saturated side of any B_crit
    # in 64..1024 - and a factor-2 grid doubled the preset's largest cost for neighbours the fit
    # cannot tell apart within one seed's noise. 8192 is gone: above a third of mnist-24k per
    # step, a 60-epoch budget is 180 steps, censored whatever the lr.
    batch_sizes: Ints | None = opt("batch sizes", preset([16, 64, 256, 1024], [16, 64, 256, 1024, 4096]))
    lrs: Floats | None = opt("lr grid tuned per batch size",
                             preset([0.03, 0.1, 0.3, 1.0], [0.01, 0.03, 0.1, 0.3, 1.0, 3.0]))
    max_epochs: PositiveInt | None = opt("epoch budget per run", preset(15, 60), le=100_000)
    target_metric: Literal["test_acc", "train_loss", "train_acc", "val_acc"] | None = \
        opt("metric of the target", "test_acc")
    target_value: float | None = opt("value of the target", preset(0.90, 0.97), allow_inf_nan=False)
    momentum: float | None = opt("momentum", 0.0, ge=0, lt=1)
    fine_steps: bool | None = opt("resolve the step a target is hit within an epoch", True)
    tiny_batch: PositiveInt | None = opt("the too-small batch of P3, run over the lr grid", 1)
    tiny_epochs: PositiveInt | None = opt("epoch budget of the tiny batch", preset(2, 5), le=100_000)
    lr_search: Literal["grid", "halving"] | None = opt(
        "lr tuning per batch size: the full grid, or successive halving that stops lrs which can "
        "no longer be fastest to the target", preset("grid", "halving"))


class Throughput(StepsToTarget):
    pass


class Schedules(Options):
    base_batch: PositiveInt | None = opt("the small batch of the recipe", 128)
    # The paper preset's large batch is the study's largest, 1024: Hoffer's equal-steps arms run
    # (large / base) x epochs, so 4096 (a sixth of mnist-24k per step) made two arms of 960 epochs
    # - 93% of the experiment and a third of the whole paper preset - for a regime the study never
    # trained. `--set large_batch=4096` still runs it.
    large_batch: PositiveInt | None = opt("the large batch", preset(512, 1024))
    lr: PositiveFloat | None = opt("lr of the small-batch recipe", 0.1)
    epochs: PositiveInt | None = opt("epochs", preset(10, 30), le=100_000)
    decay_epochs: Ints | None = opt("epochs of the step decays", preset([5, 8], [15, 25]))
    decay_factor: float | None = opt("factor of each decay", 0.1, gt=0, lt=1)
    warmup_epochs: float | None = opt("Goyal warmup epochs", preset(1.0, 2.0), ge=0, le=1000)
    tolerance: float | None = opt("accuracy tolerance of 'closes the gap'", 0.01, gt=0, lt=1)
    gbn: bool | None = opt("also run the BatchNorm arms", True)


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
    """One row per option: name, type, default, meaning - the default rendered from the
    field's declaration ("8 quick, 30 paper"), the same one `Options.resolve` fills in."""
    model = OPTIONS.get(name, Options)
    return [{"option": key, "type": type_name(f.annotation, f.metadata),
             "default": default_text(f), "meaning": f.description or ""}
            for key, f in model.model_fields.items()]


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
