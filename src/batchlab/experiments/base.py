"""What an experiment is: a declaration (`Experiment`) of the work it needs (`units`, a `Work`)
and of what it makes of the results (`analyze`); a `Context` in (preset, seeds, options, store,
executor), an `Output` out (rows, summary, claims, figures, study numbers)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from batchlab.config import TrainConfig, make_config
from batchlab.engine.result import TrainResult
from batchlab.errors import ConfigError
from batchlab.experiments.work import Results, Work
from batchlab.runs.continuation import KeepState
from batchlab.runs.store import Store

PRESETS = ("quick", "paper")
QUICK_HIDDEN = [256, 256]
"""Hidden widths of the quick preset's non-study experiments (the study's own five keep
1024-1024): 7x fewer weights, so their whole runs, curvature included, fit the CPU budget."""


class MLPOnly(ConfigError):
    """An experiment specific to the built-in MLP was asked to run on another model."""


@dataclass
class Output:
    """What an experiment produces. `figures` maps file names to matplotlib Figures."""

    rows: list[dict[str, Any]] = field(default_factory=list)
    summary: str = ""
    claims: list[Any] = field(default_factory=list)  # claims.Claim
    figures: dict[str, Any] = field(default_factory=dict)
    extra_files: dict[str, str] = field(default_factory=dict)
    study_numbers: list[Any] = field(default_factory=list)  # findings.StudyNumber, measured


@dataclass
class Context:
    """Everything an experiment may use: preset, seeds, data location, store, executor."""

    preset: str = "quick"
    seeds: int = 3
    data_dir: str | None = None
    out_dir: Path = Path("out")
    store: Store | None = None
    executor: str = "local"
    ray_address: str | None = None
    device: str = "auto"
    # log(line): one line of running commentary (the CLI prints it to stderr; None: silent)
    log_fn: Callable[[str], None] | None = None
    options: dict[str, Any] = field(default_factory=dict)  # what the user set (validated)
    # the experiment's typed options with every unset field filled from its declared preset
    # default (`options.Options.resolve`): set by `run_experiment` and the planner, read by
    # the experiments (`ctx.opts.epochs`), so a default lives only in its declaration
    opts: Any = None
    model: str | None = None  # "cnn" or "module:factory" of a user model (default: the built-in MLP)
    data: str | None = None  # "module:loader" of user data
    loss: str | None = None  # the task's loss (batchlab.task); the experiments measure accuracy
    # progress(description, done, total) as long work advances (the CLI draws a bar from it)
    progress: Callable[[str, float, float], None] | None = None
    statuses: list[str] = field(default_factory=list)  # of every run `run_many` returned

    def all_failed(self) -> str | None:
        """A one-line reason when the experiment trained runs and every one of them failed
        (the CLI then exits non-zero: its outputs hold no measurement); None otherwise."""
        if not self.statuses or any(s != "failed" for s in self.statuses):
            return None
        return (f"every one of its {len(self.statuses)} training runs failed (their errors: "
                f"`batchlab runs list --status failed`)")

    @property
    def paper(self) -> bool:
        return self.preset == "paper"

    @property
    def seed_list(self) -> list[int]:
        return list(range(self.seeds))

    def dataset_fields(self) -> dict[str, Any]:
        """The quick preset trains on the embedded mnist-5k unless a --data-dir is given;
        the paper preset uses MNIST (downloaded, or from --data-dir)."""
        if self.data_dir is not None or self.paper:
            return {"dataset": "mnist", "data_dir": self.data_dir}
        return {"dataset": "mnist-5k"}

    def generic_fields(self) -> dict[str, Any]:
        """The options that apply to every config (hidden widths, dataset, max_train, the
        train-evaluation subset: 10,000 examples in the paper preset, `PAPER_TRAIN_EVAL`)."""
        from batchlab.experiments.options import GENERIC, PAPER_TRAIN_EVAL

        out = {"train_eval_size": PAPER_TRAIN_EVAL} if self.paper and not self.data else {}
        return {**out, **{k: self.options[k] for k in GENERIC if self.options.get(k) is not None}}

    def config(self, **fields: Any) -> TrainConfig:
        user = {k: v for k, v in (("model", self.model), ("data", self.data), ("loss", self.loss))
                if v is not None}
        return make_config(**{**self.dataset_fields(), "device": self.device,
                              **self.generic_fields(), **user, **fields})

    def require_mlp(self, reason: str) -> None:
        """For experiments specific to the built-in MLP: a one-line error on any other model."""
        if self.model not in (None, "mlp"):
            raise MLPOnly(f"this experiment runs on the built-in MLP only ({reason}); "
                          f"drop --model {self.model}")

    def log(self, line: str) -> None:
        if self.log_fn is not None:
            self.log_fn(line)

    def model_name(self, **fields: Any) -> str:
        """What the configs train, in words, for summaries (presets differ in widths)."""
        cfg = self.config(**fields)
        if cfg.model != "mlp":
            return f"model {cfg.model}"
        return f"the built-in MLP, hidden widths {'-'.join(map(str, cfg.hidden))}"

    def test_size(self, **fields: Any) -> int:
        """Examples in the test set the configs are scored on (for accuracies' binomial error)."""
        from batchlab.engine.setup import get_data, resolve_device

        cfg = self.config(**fields)
        return len(get_data(cfg, resolve_device(cfg.device)).eval_sets["test"][1])

    def run_many(self, configs: Sequence[TrainConfig], label: str,
                 keep_state: KeepState = False) -> list[TrainResult]:
        """Train (or fetch from the store) every config; results in the same order.
        `keep_state`: the runs keep their end state, for longer configs of a later call to
        continue (`batchlab.runs.continuation`)."""
        from batchlab.runs.executors import run_configs

        if self.store is None:
            raise ConfigError("experiments need a results store")
        self.require_task(configs, label)
        results = run_configs(list(configs), self.store, executor=self.executor,
                              ray_address=self.ray_address, label=label, progress=self.progress,
                              keep_state=keep_state)
        self.statuses.extend(r.status for r in results)
        return results

    def require_task(self, configs: Sequence[TrainConfig], what: str) -> None:
        """The experiments' claims are about classification accuracy on resident tensors: a
        one-line error naming the metric for another loss, and for streamed data."""
        from batchlab.task import objective_for, require_accuracy

        for loss in sorted({c.loss for c in configs}):
            require_accuracy(objective_for(loss), f"experiment {what}")
        if self.data is not None and configs:
            from batchlab.engine.setup import get_data, resolve_device

            c = configs[0]
            if getattr(get_data(c, resolve_device(c.device)), "streamed", False):
                raise ConfigError(f"experiment {what} needs tensors (X, y) from --data {self.data}; "
                                  f"a streamed source trains with `batchlab train` and `recommend`")

    def out(self, name: str) -> Path:
        d = self.out_dir / name
        d.mkdir(parents=True, exist_ok=True)
        return d


@dataclass
class Experiment:
    """An experiment declared: `units(ctx)` -> the `Work` it needs (training runs, trials,
    curvature, timings), `analyze(ctx, results)` -> its `Output`. `run` is the same for every
    experiment, and `--plan` costs `units` without running anything.

    `options`: its typed options model (an `options.Options` subclass; None: the one
    `options.OPTIONS` holds under its name). `findings`: finding id -> title of findings the
    sources' checklist (`findings.FINDINGS`) does not hold yet, added on registration."""

    name: str
    title: str
    units: Callable[[Context], Work]
    analyze: Callable[[Context, Results], Output]
    description: str = ""
    mlp_only: str | None = None  # why it needs the built-in MLP (it then refuses other models)
    # defaults of the quick preset only (the user's --set wins; the paper preset ignores them)
    quick_options: dict[str, Any] = field(default_factory=dict)
    options: type | None = None
    findings: dict[str, str] = field(default_factory=dict)

    def run(self, ctx: Context) -> Output:
        """Train (or fetch) the declared runs, then analyze them (work that depends on their
        results - `later_runs`, trials, curvature - is carried out by `analyze`)."""
        work = self.units(ctx)
        runs = (ctx.run_many(work.runs, label=work.label, keep_state=work.keep_state)
                if work.runs else [])
        return self.analyze(ctx, Results(work, runs))

    def options_for(self, ctx: Context) -> dict[str, Any]:
        """The context's options with this experiment's quick-preset defaults under them.
        Why: the non-study experiments (sharpness, steps-to-target, schedules, large-batch
        fixes) train a smaller MLP in the quick preset so that `reproduce` fits its CPU budget;
        a width only means something for the built-in MLP, so a user's model gets none."""
        if ctx.paper or ctx.model not in (None, "mlp"):
            return dict(ctx.options)
        return {**self.quick_options, **ctx.options}
