"""Shared machinery of the MNIST batch-size study's five experiments (batch-size,
learning-rate, switch, distance, adam-vs-sgd).

Why one module: the experiments share their reference runs (64 @ lr 0.01 appears in four of
them). The store dedupes runs by config key, so as long as every experiment builds its configs
through `Study.spec` -> `Study.work`, the shared runs are trained once. This module also holds
the seed aggregation (mean and spread), the markdown formatting of "mean ± sd" and the curve
plots, so the five experiment modules only say *what* to run and *what* to conclude.

How the claims are measured (the v3 verdict engine, `intervals.py` / `accuracies.py`): n is
the number of training seeds. Arms share seeds, so accuracies of two arms are differenced per
seed, with the per-example paired test-set variance from the runs' correct bits
(`acc_difference`); trends and rank correlations are computed inside each seed first (one
slope or Kendall tau per seed). A claim about where an arm ends up carries a `converged` gate
(train-accuracy plateau), so an arm still climbing at the budget run leaves it `untestable`.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from batchlab.engine.result import TrainResult
from batchlab.experiments import findings
from batchlab.experiments import intervals as I
from batchlab.experiments import verdicts as V
from batchlab.experiments.accuracies import accuracy, accuracy_difference, bits_to_array
from batchlab.experiments.base import Context
from batchlab.experiments.claims import Gate
from batchlab.experiments.intervals import Interval
from batchlab.experiments.options import StudyOptions
from batchlab.experiments.outputs import rows_to_csv
from batchlab.experiments.schedules_exp import PLATEAU_TOL, learned, plateau_gain, train_rise
from batchlab.experiments.work import Results, Work

# the study's E (the paper preset's default) and the quick preset's stand-in, as
# `options.StudyOptions` declares them (see each experiment's summary). The quick preset runs 5
# epochs: with three seeds the five experiments must fit in a few minutes of a 2-core CPU
# (measured; see the summaries), so large-batch runs are far from converged
PAPER_EPOCHS = StudyOptions().resolve("paper").epochs
QUICK_EPOCHS = StudyOptions().resolve("quick").epochs
BASE_LR = 0.01
# the study's settings as `findings.STUDY_NUMBERS` names them
SET_64 = "SGD bs 64 lr 0.01 30 epochs"
SET_1024 = "SGD bs 1024 lr 0.01 30 epochs"
SET_1024_LR = "SGD bs 1024 lr 0.1 30 epochs"
SET_1024_LONG = "SGD bs 1024 lr 0.01 480 epochs"
SET_ADAM = "Adam bs 64 lr 0.01 30 epochs"
ACC_TOL = 0.01
"""Equivalence tolerance of "reaches" / "recovers" / "like": within 1 point of test accuracy,
less than half of what the study's large batch lost (98% -> 95-96%)."""


def nan_float(v: Any) -> float:
    """A stored metric as a float; missing or non-finite values (diverged runs) become NaN."""
    try:
        f = float(v)
    except (TypeError, ValueError):
        return float("nan")
    return f if math.isfinite(f) else float("nan")


@dataclass
class Group:
    """One configuration trained with every seed of the context."""

    name: str
    fields: dict[str, Any]
    runs: list[TrainResult] = field(default_factory=list)

    def final(self, metric: str) -> list[float]:
        """The metric after the last epoch, one value per seed (NaN if the run diverged)."""
        out = []
        for r in self.runs:
            last = r.epochs[-1] if r.epochs else {}
            ok = r.status == "completed"
            out.append(nan_float(last.get(metric)) if ok else float("nan"))
        return out

    def best(self, metric: str) -> list[float]:
        """The best (max) value over epochs 1..end, one per seed."""
        out = []
        for r in self.runs:
            vals = [nan_float(e.get(metric)) for e in r.epochs[1:]]
            vals = [v for v in vals if math.isfinite(v)]
            out.append(max(vals) if vals else float("nan"))
        return out

    def at_epoch(self, metric: str, epoch: int) -> list[float]:
        out = []
        for r in self.runs:
            row = next((e for e in r.epochs if e.get("epoch") == epoch), {})
            out.append(nan_float(row.get(metric)))
        return out

    def correct(self, n_test: int) -> list[np.ndarray | None]:
        """Per seed, which of the `n_test` shared test examples the final model gets right
        (None where the run recorded none): what pairs two arms' accuracies example by
        example."""
        return [bits_to_array(r.final.get("test_correct_bits"), n_test)
                if r.status == "completed" else None for r in self.runs]

    def plateau(self) -> list[float | None]:
        """Per seed, the train-accuracy change over the last fifth of the epochs (~0 once the
        run has converged; `schedules_exp.plateau_gain`)."""
        return [plateau_gain(r.epochs) if r.status == "completed" else None for r in self.runs]

    def rise(self) -> list[float | None]:
        """Per seed, the train-accuracy rise since the initial weights (`learned`)."""
        return [train_rise(r.epochs) if r.status == "completed" else None for r in self.runs]

    def curve(self, metric: str, x: str = "epoch") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(x, mean over seeds, sd over seeds) of a per-epoch metric; seeds are aligned by
        epoch, and a run that stopped early contributes NaN afterwards."""
        n = max((len(r.epochs) for r in self.runs), default=0)
        ys = np.full((len(self.runs), n), np.nan)
        xs = np.full(n, np.nan)
        for i, r in enumerate(self.runs):
            for j, e in enumerate(r.epochs):
                ys[i, j] = nan_float(e.get(metric))
                if np.isnan(xs[j]):
                    xs[j] = nan_float(e.get(x))
        with warnings.catch_warnings():  # all-NaN columns (diverged runs) are expected
            warnings.simplefilter("ignore", RuntimeWarning)
            mean = np.nanmean(ys, axis=0)
            sd = np.nanstd(ys, axis=0, ddof=1) if len(self.runs) > 1 else np.zeros(n)
        return xs, mean, sd


class Study:
    """The study's settings for one experiment run: epochs E, model width, dataset, seeds.

    `ctx.opts` (the experiment's options from `--set KEY=VALUE`, typed and resolved for the
    preset by `options.py`) holds `epochs` and the experiment's own keys; `hidden`, `dataset`
    and `max_train` reach the configs through `Context.config`.
    """

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        self.opts = ctx.opts  # an `options.StudyOptions`, every field resolved
        self.epochs: int = self.opts.epochs
        self.base: dict[str, Any] = {}  # hidden / dataset / max_train: `Context.config` applies them
        self._sizes: tuple[int, int] | None = None

    @staticmethod
    def distinct(values: Sequence[float]) -> list:
        """A grid option's values sorted, each once (the model has checked their type and sign)."""
        return sorted(set(values))

    # -- configs and runs ---------------------------------------------------------------
    def spec(self, batch_size: int, lr: float = BASE_LR, epochs: int | None = None,
             **extra: Any) -> dict[str, Any]:
        """The fields of one configuration. Every experiment builds its runs through this, so
        identical runs have identical configs (and the store trains them once)."""
        return {"batch_size": batch_size, "lr": lr,
                "epochs": self.epochs if epochs is None else epochs, **extra}

    def work(self, specs: dict[str, dict[str, Any]], label: str, keep_state: bool = False,
             **state: Any) -> Work:
        """Every spec with every seed, declared as one experiment's runs (one `run_many` call,
        so progress and resumption cover the whole experiment); `state` goes with them to
        `analyze`. `keep_state`: the runs keep their end state, so other experiments'
        longer runs continue them (`runs.continuation`)."""
        configs, owners = [], []
        for name, fields in specs.items():
            for seed in self.ctx.seed_list:
                configs.append(self.ctx.config(**{**self.base, **fields, "seed": seed}))
                owners.append(name)
        return Work(label, runs=configs, keep_state=keep_state,
                    state={**state, "specs": specs, "owners": owners})

    @staticmethod
    def groups(results: Results) -> dict[str, Group]:
        """The trained runs of `work`'s specs, one `Group` per spec (seeds in order)."""
        specs = results.state["specs"]
        groups = {name: Group(name, fields) for name, fields in specs.items()}
        for name, res in zip(results.state["owners"], results.runs):
            groups[name].runs.append(res)
        return groups

    # -- what the numbers rest on ---------------------------------------------------------
    def sizes(self, groups: Iterable[Group]) -> tuple[int, int]:
        """(train, test) examples of the runs' dataset: what an accuracy's test-set (or
        training-set) sampling error is computed over (train accuracy is measured on the whole
        training set)."""
        if self._sizes is None:
            from batchlab.data import load_dataset

            cfg = next(iter(groups)).runs[0].config
            raw = load_dataset(cfg.dataset, cfg.data_dir)
            n_train = min(cfg.max_train or len(raw.y_train), len(raw.y_train))
            self._sizes = (n_train, len(raw.y_test))
        return self._sizes

    def note(self, groups: Iterable[Group], what: str) -> str:
        """A study number's match note: preset, dataset, seeds and how the run matches."""
        groups = list(groups)
        cfg = groups[0].runs[0].config
        n_train, n_test = self.sizes(groups)
        width = "-".join(map(str, cfg.hidden))
        return (f"{self.ctx.preset} preset, {cfg.dataset} ({n_train} train / {n_test} test), "
                f"hidden {width}, {self.ctx.seeds} seed(s): {what}")

    def number(self, finding: str, quantity: str, setting: str, iv: Interval,
               groups: Iterable[Group], what: str) -> findings.StudyNumber:
        """The registry's study number (`findings.STUDY_NUMBERS`) with our measurement."""
        return findings.template(finding, quantity, setting).with_measurement(
            iv, self.note(groups, what))

    def no_match(self, finding: str, quantity: str, setting: str,
                 reason: str) -> findings.StudyNumber:
        """The registry's study number left blank: no run of ours matches its setting."""
        return findings.template(finding, quantity, setting).without_match(
            f"{self.ctx.preset} preset: {reason}")

    # -- reporting ----------------------------------------------------------------------
    def header(self, groups: Iterable[Group], notes: str = "") -> str:
        """Which preset, dataset, epochs and seeds produced the numbers below."""
        from batchlab.engine.setup import get_data, resolve_device

        groups = list(groups)
        cfg = groups[0].runs[0].config
        td = get_data(cfg, resolve_device(cfg.device))
        n_train = cfg.max_train or td.n_train
        net = {"mlp": f"MLP {'-'.join(map(str, [td.input_dim, *cfg.hidden, td.n_classes]))}, "
                      f"init {cfg.init}, ReLU",
               "cnn": f"LeNet-sized CNN, init {cfg.init}"}.get(cfg.model, f"model {cfg.model}")
        engines = sorted({str(r.final.get("engine", "?")) for g in groups for r in g.runs
                          if not r.cached} or {"(from store)"})
        lines = [
            f"- preset: **{self.ctx.preset}**; dataset: **{cfg.data or cfg.dataset}** "
            f"({n_train} train / {len(td.eval_sets['test'][1])} test images)",
            f"- E = **{self.epochs}** epochs (the study: {PAPER_EPOCHS}); {net}, "
            f"NLL loss, plain SGD "
            f"(no momentum) unless stated",
            f"- seeds per configuration: **{self.ctx.seeds}** ({', '.join(map(str, self.ctx.seed_list))}); "
            f"tables give mean ± sd over seeds (sd only with 2+ seeds); accuracies in %",
            f"- engine(s) of newly trained runs: {', '.join(engines)}",
        ]
        bad = [f"{g.name} seed {r.config.seed}: {r.status}" for g in groups for r in g.runs
               if r.status != "completed"]
        if bad:
            lines.append(f"- runs that did not complete (their metrics count as missing): "
                         f"{'; '.join(bad)}")
        if not self.ctx.paper:
            lines.append(f"- quick preset: a small dataset and few epochs (E = {QUICK_EPOCHS} by "
                         "default, cut from 10 so three seeds of the five study experiments fit "
                         "the preset's CPU budget), so large-batch runs are far from "
                         "convergence: claims about where the arms end up are gated on their "
                         "train accuracy having plateaued and come out untestable where it has "
                         "not (the paper preset runs the study's settings)")
        if notes:
            lines.append(notes)
        return "\n".join(lines) + "\n"


def mean_sd(values: Sequence[float]) -> tuple[float, float, int]:
    a = np.asarray([v for v in values if math.isfinite(v)], dtype=float)
    if a.size == 0:
        return float("nan"), float("nan"), 0
    return float(a.mean()), float(a.std(ddof=1)) if a.size > 1 else 0.0, int(a.size)


def mean(values: Sequence[float]) -> float:
    return mean_sd(values)[0]


def pm(values: Sequence[float], scale: float = 1.0, digits: int = 2) -> str:
    """'mean ± sd' (sd only with 2+ finite values; 'n/a' when none is finite)."""
    m, s, n = mean_sd(values)
    if n == 0:
        return "n/a"
    text = f"{m * scale:.{digits}f}"
    if n > 1:
        text += f" ± {s * scale:.{digits}f}"
    if n < len(values):
        text += f" ({len(values) - n} missing)"
    return text


def acc_difference(a: Group, b: Group, n: int, metric: str = "test_acc") -> Interval:
    """mean over seeds of a_s - b_s of a final accuracy, paired by seed. The test accuracy
    adds the shared test set's sampling error, from the per-example paired difference of the
    runs' correct bits. The train accuracy is measured on the whole training set the runs fit,
    so no test-set term: its interval is the paired t interval over seeds alone. One seed:
    unbounded (no seed variance), so never decided."""
    if metric != "test_acc":
        return I.difference(a.final(metric), b.final(metric))
    return accuracy_difference(a.final(metric), b.final(metric), n, correct_a=a.correct(n),
                               correct_b=b.correct(n))


def acc_interval(g: Group, n: int, metric: str = "test_acc") -> Interval:
    """An arm's mean final accuracy over seeds; the test accuracy with the test set's
    sampling error (see `acc_difference` for the train accuracy)."""
    if metric != "test_acc":
        return I.replicate_mean(g.final(metric), what=f"final {metric.replace('_', ' ')}")
    return accuracy(g.final(metric), n, correct=g.correct(n))


def value_interval(values: Sequence[float], what: str = "per-seed values") -> Interval:
    """The mean of one value per seed (a distance, a norm, a cosine) with its t interval."""
    return I.replicate_mean(values, what=what)


def converged(g: Group) -> Gate:
    """The premise of a claim about where an arm ends up (asymptotic / final accuracy,
    "reaches", "recovers"): its train accuracy has plateaued - the per-seed change over the
    last fifth of its epochs, interval over seeds, within +-PLATEAU_TOL. A gate passes only
    when its whole interval is inside, so an arm still climbing (or one seed) leaves the claim
    untestable at this budget rather than decided on a snapshot."""
    return Gate(f"{g.name} converged", f"train-accuracy change of {g.name} over the last fifth "
                "of its epochs", I.replicate_mean(g.plateau(), what="train-accuracy changes"),
                V.within(PLATEAU_TOL))


def converged_all(*groups: Group) -> list[Gate]:
    """`converged` and `learned` (a flat run must also have trained) for every distinct arm a
    claim compares."""
    seen: dict[str, Group] = {}
    for g in groups:
        seen.setdefault(g.name, g)
    return [gate for g in seen.values()
            for gate in (converged(g), learned(g.name, g.rise()))]


def per_seed_series(groups: Sequence[Group], x: Sequence[float], metric: str
                    ) -> list[tuple[list[float], list[float]]]:
    """One (x, y) series per seed over the arms (x[i] belongs to groups[i]): what a trend or a
    rank correlation is computed from inside one replicate (seeds are aligned by index)."""
    n = min((len(g.runs) for g in groups), default=0)
    finals = [g.final(metric) for g in groups]
    return [(list(map(float, x)), [f[s] for f in finals]) for s in range(n)]


def per_seed(**named: Sequence[float]) -> dict[str, list[float]]:
    """Evidence: the per-seed inputs of a claim, by name."""
    return {k: [float(x) for x in v] for k, v in named.items()}


def run_rows(groups: dict[str, Group], metrics: Sequence[str], **columns: Any) -> list[dict]:
    """results.csv rows: one per run (configuration x seed) with its final metrics."""
    rows = []
    for name, g in groups.items():
        for r in g.runs:
            last = r.epochs[-1] if r.epochs else {}
            row = {"config": name, **columns.get(name, {}), "seed": r.config.seed,
                   "run_id": r.run_id, "status": r.status, "epochs": len(r.epochs) - 1,
                   "steps": last.get("steps")}
            row.update({m: last.get(m) for m in metrics})
            rows.append(row)
    return rows


def curves_csv(groups: dict[str, Group], metrics: Sequence[str]) -> str:
    """Every run's per-epoch curve (for re-plotting without the store)."""
    rows = []
    for name, g in groups.items():
        for r in g.runs:
            for e in r.epochs:
                rows.append({"config": name, "seed": r.config.seed, "epoch": e.get("epoch"),
                             "batch_size": e.get("batch_size"), "lr": e.get("lr"),
                             "steps": e.get("steps"), **{m: e.get(m) for m in metrics}})
    return rows_to_csv(rows)


# -- figures ------------------------------------------------------------------------------
ACC_METRICS = ("train_acc", "test_acc")
