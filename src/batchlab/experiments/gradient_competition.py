"""Gradient competition (MNIST study, part 2): do samples in one batch "compete"?

**Replicates.** One replicate is the checkpoint of one training seed: the experiment trains one
trajectory per seed (`--seeds`, default 3; its early and late checkpoints are the end states
of an early run and of the late run that continues it, `checkpoint_config`) and measures every
trial design on each. A checkpoint's trials are summarised inside it (one
estimate per seed: an exponent, a slope, a tau, a ratio) and the claims' intervals are taken
across seeds (`gradient_competition_claims`); with one seed they are unbounded and decide
nothing. Checkpoint files given by the user (both `checkpoint_early` and `checkpoint_late`) are
one replicate.

Each trial sums the last layer's weight gradients over one pass through the same `n_samples`
(1024) samples at every batch size b, in three documented modes (`batchlab.analysis.gradcomp`:
displacement, sample-sum, sum-loss); every claim is made in every reading beside the value the
reading gives by algebra alone. Also answers the study's open questions: the functional form
of std(norm) vs b, and the sample-vs-order split of the norm's variance (nested design: a few
fixed sample sets x several orders each, per checkpoint).

**Trials per checkpoint (resolution argument).** The trials of a checkpoint only set how
precisely that checkpoint's own estimate is known. At lr 0.01 the norm's coefficient of
variation across trials is 0.5-4 %, so with T trials the within-checkpoint standard error of
the exponent (`gradient_competition_stats.exponent_se`, reported in the summary) is about
0.02 / sqrt(T) / (sd(log b) sqrt(#b)) ~ 0.003 at T = 3 - a hundred times below the regions'
width (0.3) - while the spread between seeds is what the interval measures. So the quick preset
runs 3 trials per checkpoint (9 per b over its 3 seeds, against 8 on one checkpoint before)
and the paper preset 64. The paper preset's other per-checkpoint statistics set that number:
the spread of the norm across trials (S5) is a standard deviation, known to a relative error
of 1 / sqrt(2 (T - 1)) = 8.9 % at T = 64, so the per-checkpoint slope of log spread over the 16
batch sizes (sd of ln b = 2.1) has a standard error of about 0.089 / (2.1 x 4) = 0.01, a
thirtieth of the regions' width; the tail counts (S7) pool T x 10,240 gradient values per b
(655,360 at T = 64). More trials would refine what the seeds' spread already swamps: 320
(the earlier paper default, about the study's 1,000 over three seeds) cost 0.51 PFLOP more,
an eighth of the whole paper preset.

Options (`--set KEY=VALUE`): `options.GradientCompetition` declares them with their defaults
(`batchlab experiment options gradient-competition`); trials and decomposition cells count per
checkpoint.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from batchlab.analysis import gradcomp as gc
from batchlab.analysis.gradcomp_runner import run_trials
from batchlab.analysis.gradcomp_trials import TrialRun
from batchlab.config import Phase, TrainConfig
from batchlab.engine.setup import build_model, get_data, resolve_device
from batchlab.errors import ConfigError
from batchlab.experiments import gradient_competition_stats as GS
from batchlab.experiments.base import Context, Experiment, Output
from batchlab.experiments.gradient_competition_claims import (
    REGIMES,
    Design,
    Replicate,
    claims_for,
    study_numbers,
)
from batchlab.experiments.gradient_competition_figures import figures
from batchlab.experiments.gradient_competition_summary import summary_md
from batchlab.experiments.options import GradientCompetition as GCOptions
from batchlab.experiments.work import Results, Trials, Work
from batchlab.nn.checkpoint import load_state

NAME = "gradient-competition"

def options(ctx: Context) -> GCOptions:
    """The resolved options (`ctx.opts`; `options.GradientCompetition` declares every default
    and checks every field) with the checks that span two fields: batch sizes sorted, unique
    and within 1..n_samples, and 1 <= early_epochs < late_epochs."""
    o: GCOptions = ctx.opts
    n = o.n_samples
    o = o.model_copy(update={"batch_sizes": gc.validate_batch_sizes(o.batch_sizes, n),
                             "decomp_batch_sizes": gc.validate_batch_sizes(o.decomp_batch_sizes, n)})
    if not o.early_epochs < o.late_epochs:
        raise ConfigError("need 1 <= early_epochs < late_epochs")
    return o


# -- checkpoints -------------------------------------------------------------------------
def checkpoint_config(ctx: Context, o: GCOptions, seed: int, regime: str = "late") -> TrainConfig:
    """The run of training seed `seed` whose last epoch is checkpoint `regime`.

    Why two runs per seed and not one run keeping both checkpoints: the early run
    (`early_epochs` at batch 1024) is the late run's prefix, so the late run continues it
    (`runs.continuation`) - one trajectory, trained once - and the late run, keeping no
    checkpoint, is the very config another experiment trains (batch-size's 1024 run at the
    paper preset), stored once for both; its weights are its kept end state. Ray does not keep
    end states: there one run keeps both checkpoints."""
    e, late = o.early_epochs, o.late_epochs
    fields: dict[str, Any] = dict(lr=o.lr, init="glorot", batch_size=1024, epochs=late,
                                  hidden=list(o.hidden), seed=int(seed))
    if o.late_batch_size != 1024:
        fields["schedule"] = [Phase(epochs=e, batch_size=1024),
                              Phase(epochs=late - e, batch_size=o.late_batch_size)]
    if ctx.executor == "ray":
        return ctx.config(**fields, checkpoint_epochs=[e, late])
    if regime == "early":
        fields.pop("schedule", None)
        fields["epochs"] = e
    return ctx.config(**fields)


def user_checkpoints(o: GCOptions) -> bool:
    """True when the user gives both checkpoint files (one replicate); one alone is an error."""
    given = [o.checkpoint_early, o.checkpoint_late]
    if any(given) and not all(given):
        raise ConfigError("give both checkpoint_early and checkpoint_late (one pair of "
                          "checkpoint files is one replicate), or neither")
    return all(given)


def checkpoint_configs(ctx: Context, o: GCOptions) -> list[dict[str, TrainConfig]]:
    """Per training seed, the run of each regime's checkpoint (none with user checkpoint
    files)."""
    if user_checkpoints(o):
        return []
    return [{r: checkpoint_config(ctx, o, s, r) for r in REGIMES} for s in ctx.seed_list]


def _train_acc(res: Any, epoch: int) -> float:
    for row in res.epochs:
        if row.get("epoch") == epoch and row.get("train_acc") is not None:
            return float(row["train_acc"])
    return math.nan


def _weights(ctx: Context, res: Any, epoch: int) -> dict[str, Any]:
    """The run's weights at `epoch`: a checkpoint, or its kept end state. A run stored before
    runs kept their end state has neither at its last epoch: it is trained again keeping that
    epoch as a checkpoint (continuing the early run, so the early epochs are not repeated)."""
    if res.status != "completed":
        raise ConfigError(f"checkpoint training run {res.run_id} {res.status}")
    try:
        return res.checkpoint(epoch)
    except KeyError:
        cfg = res.config.model_copy(update={"checkpoint_epochs": [epoch]})
        again = ctx.run_many([cfg], label=f"{NAME}:checkpoint")[0]
        if again.status != "completed":
            raise ConfigError(f"checkpoint training run {again.run_id} {again.status}") from None
        return again.checkpoint(epoch)


def checkpoints(ctx: Context, o: GCOptions, trained: list[Any]):
    """(config, data, [(replicate id, {regime: state}, late train accuracy)]): each seed's
    checkpoints from its training runs (`trained`, the results of `checkpoint_configs` in
    order, regimes within seeds), or the user's files."""
    late = o.late_epochs
    cfg = checkpoint_config(ctx, o, ctx.seed_list[0] if ctx.seed_list else 0)
    data = get_data(cfg, resolve_device(cfg.device))
    if user_checkpoints(o):
        states = {r: load_state(Path(getattr(o, f"checkpoint_{r}"))) for r in REGIMES}
        return cfg, data, [("user", states, math.nan)]
    epoch = {"early": o.early_epochs, "late": late}
    runs = iter(trained)
    reps = []
    for per_seed in checkpoint_configs(ctx, o):
        res = {r: next(runs) for r in per_seed}
        reps.append((int(res["late"].config.seed),
                     {r: _weights(ctx, res[r], epoch[r]) for r in REGIMES},
                     _train_acc(res["late"], late)))
    return cfg, data, reps


# -- the experiment ----------------------------------------------------------------------
def units(ctx: Context) -> Work:
    """One checkpoint run per training seed, then on each of its two checkpoints (or on the
    user's pair of files) the main and the decomposition trial designs (`trial_runs`): their
    number is known up front, their weights only once the checkpoint runs are trained."""
    o = options(ctx)
    per_seed = checkpoint_configs(ctx, o)
    cfg = checkpoint_config(ctx, o, 0)
    n_train = get_data(cfg, resolve_device(cfg.device)).n_train
    if o.n_samples > n_train:  # refused before anything trains (and by the plan alike)
        raise ConfigError(f"n_samples {o.n_samples} exceeds the training set ({n_train})")
    for regime in REGIMES if user_checkpoints(o) else ():
        p = Path(getattr(o, f"checkpoint_{regime}"))
        if not p.is_file():
            raise ConfigError(f"checkpoint file {p} does not exist")
    reps: list[tuple[int | str, dict[str, TrainConfig] | None]] = (
        [("user", None)] if user_checkpoints(o) else [(int(c["late"].seed), c) for c in per_seed])
    epoch = {"early": o.early_epochs, "late": o.late_epochs}
    trials = [Trials(rid, regime, run, cfg, c[regime] if c else None, epoch[regime],
                     o.keep_tensors)
              for rid, c in reps for regime in REGIMES for run in trial_runs(o, regime, rid)]
    runs = [c[r] for c in per_seed for r in REGIMES]
    # kept: the late run continues the early one (and Ray, which keeps no end state, trains
    # one run with both checkpoints, listed once per regime: the store trains it once)
    return Work(NAME, runs=runs, trials=trials, keep_state=True)


def trial_runs(o: GCOptions, regime: str, replicate: int | str = 0
               ) -> tuple[TrialRun, TrialRun]:
    """The main and the decomposition trial designs of one regime of one replicate (trial
    seeds recorded; a pure function of the trial seed, the replicate and the regime)."""
    seed, T = o.seed, o.trials
    stream = f"ckpt{replicate}/{regime}"
    common = dict(n_samples=o.n_samples, lr=o.lr,
                  blowup_loss=o.blowup_loss, k=o.k, threads=o.threads,
                  backend=o.engine, chunk=o.chunk)
    fixed = gc.trial_seeds(seed, f"{stream}/samples", 1)[0] if o.same_samples else None
    main = TrialRun(f"{regime}-{replicate}", gc.trial_seeds(seed, stream, T), [fixed] * T,
                    o.batch_sizes, o.modes, **common)
    S, R = o.decomp_sets, o.decomp_orders
    set_seeds = gc.trial_seeds(seed, f"{stream}/sets", S)
    dmodes = [m for m in ("displacement", "sample-sum") if m in o.modes] or ["displacement"]
    dec = TrialRun(f"{regime}-{replicate}-decomp", gc.trial_seeds(seed, f"{stream}/orders", S * R),
                   [s for s in set_seeds for _ in range(R)], o.decomp_batch_sizes, dmodes,
                   **common)
    return main, dec


def _trials(ctx: Context, run: TrialRun, model, data, o: GCOptions) -> dict[int, dict]:
    """`run_trials` through the store and the context's executor; progress is reported in
    SGD steps (a b=1 trial is 1024 steps, a b=1024 trial one), so time remaining means
    something; the CLI draws it (`ctx.progress`)."""
    tdir = Path(o.tensor_dir) if o.tensor_dir else ctx.out(NAME) / "tensors"
    steps = {b: run.steps(b) for b in run.batch_sizes}
    total = len(run.seeds) * sum(steps.values())
    done = [0]
    label = f"{run.name} trials"
    bar = ctx.progress

    def advance(b: int, trials: int) -> None:
        done[0] += trials * steps[b]
        if bar is not None:
            bar(label, done[0], total)

    return run_trials(run, model, data.x_train, data.y_train, ctx.store,
                      tensor_dir=tdir, keep_tensors=o.keep_tensors,
                      executor=ctx.executor, ray_address=ctx.ray_address, progress=ctx.log,
                      advance=advance)


def _rows(reps: list[Replicate], design: Design) -> list[dict[str, Any]]:
    """results.csv: per (regime, reading, replicate, b) the norm and value statistics, the
    fraction above the replicate's common threshold and the diverged trials; per (regime,
    reading, replicate, b) of the nested design the relative spread across sample sets and
    the variance split."""
    rows: list[dict[str, Any]] = []
    for rep in reps:
        for r in REGIMES:
            for m in design.modes:
                by_b = rep.recs[r]
                fr, edge = GS.tail_fractions(by_b, m, GS.common_threshold(by_b, m))
                rows += [{"kind": "norm", "regime": r, "mode": m, "replicate": rep.seed, **x,
                          "tail_fraction": fr[x["b"]], "threshold": edge}
                         for x in GS.per_b(by_b, m)]
            for b, rec in sorted(rep.decomp.get(r, {}).items()):
                for m in rec["modes"]:
                    v = np.array([np.nan if x is None else x for x in rec["modes"][m]["norms"]])
                    rows.append({"kind": "decomposition", "regime": r, "mode": m,
                                 "replicate": rep.seed, "b": b, "sets": design.sets,
                                 "orders": design.orders,
                                 "relative_spread": GS.relative_spread(v, design.sets,
                                                                       design.orders),
                                 **GS.decompose(v, design.sets, design.orders)})
    return rows


def _nanmean(values: list[float]) -> float:
    """The mean of the finite values; NaN when none (a b whose trials all diverged)."""
    v = [x for x in values if math.isfinite(x)]
    return float(np.mean(v)) if v else math.nan


def _fits(rows: list[dict[str, Any]], claims: list[Any], design: Design) -> list[dict[str, Any]]:
    """Per (regime, reading): the exponent across replicates (from the claim's evidence), the
    within-checkpoint SE (the resolution), and open question 1 on the replicates' mean std."""
    by_id = {c.id: c for c in claims}
    out = []
    for m in design.modes:
        c = by_id.get(f"{m}:larger-batch-larger-step")
        for r in REGIMES:
            ev = c.evidence[r] if c is not None else {}
            norm = [x for x in rows if x["kind"] == "norm" and x["regime"] == r and x["mode"] == m]
            bs = sorted({x["b"] for x in norm})
            sds = [_nanmean([x["std"] for x in norm if x["b"] == b]) for b in bs]
            means = [_nanmean([x["mean"] for x in norm if x["b"] == b]) for b in bs]
            ok = [(b, mu) for b, mu in zip(bs, means) if mu > 0]
            lb = np.log([b for b, _ in ok]) if len(ok) >= 2 else None
            pre = math.nan
            if lb is not None and ev:
                pre = float(np.exp(np.mean(np.log([mu for _, mu in ok])) - ev["estimate"] *
                                   np.mean(lb)))
            ses = [p["within_se"] for p in ev.get("per_replicate", [])]
            form = GS.std_form(bs, sds)
            out.append({"kind": "fit", "regime": r, "mode": m,
                        "exponent": ev.get("estimate", math.nan),
                        "ci_low": (ev.get("ci") or [math.nan, math.nan])[0],
                        "ci_high": (ev.get("ci") or [math.nan, math.nan])[1],
                        "replicates": ev.get("n", 0), "prefactor": pre,
                        "within_se": float(np.nanmedian(ses)) if ses and
                        any(math.isfinite(x) for x in ses) else math.nan,
                        **{f"std_{k}": v for k, v in form.items()}})
    return out


def analyze(ctx: Context, results: Results) -> Output:
    o = options(ctx)
    if ctx.store is None:
        raise ConfigError("gradient-competition needs a results store")
    cfg, data, ckpts = checkpoints(ctx, o, results.runs)
    model = build_model(cfg, data)
    T = o.trials
    design = Design(list(o.modes), o.decomp_sets, o.decomp_orders)
    reps: list[Replicate] = []
    trial_rows = []
    for rid, states, acc in ckpts:
        rep = Replicate(rid, {}, {}, acc)
        for regime in REGIMES:
            gc.fit_state(model, states[regime], f"{regime} checkpoint of replicate {rid}")
            main, dec = (u.run for u in results.work.trials  # as declared by `units`
                         if (u.replicate, u.regime) == (rid, regime))
            rep.recs[regime] = _trials(ctx, main, model, data, o)
            rep.decomp[regime] = _trials(ctx, dec, model, data, o)
            for b, rec in rep.recs[regime].items():
                for m in o.modes:
                    mm = rec["modes"][m]
                    trial_rows += [{"replicate": rid, "regime": regime, "mode": m, "b": b,
                                    "trial": t, "seed": s, "sample_seed": ss,
                                    "norm": mm["norms"][t], "max_step_loss": mm["max_loss"][t],
                                    "blowup": mm["blowup"][t]}
                                   for t, (s, ss) in enumerate(zip(main.seeds, main.sample_seeds))]
        reps.append(rep)

    claims, readings = claims_for(reps, design)
    rows = _rows(reps, design)
    fits = _fits(rows, claims, design)
    rows += fits + readings
    summary = summary_md(rows, claims, o, cfg, T, len(reps))
    from batchlab.experiments.outputs import rows_to_csv

    note = (f"preset {ctx.preset}, {len(reps)} checkpoint seed(s) x {T} trials per b, "
            f"checkpoints after epochs {o.early_epochs} and {o.late_epochs}")
    return Output(rows=rows, summary=summary, claims=claims,
                  figures=figures(rows, fits, reps, o),
                  extra_files={"trials.csv": rows_to_csv(trial_rows)},
                  study_numbers=study_numbers(reps, claims, list(o.modes), note))


EXPERIMENT = Experiment(NAME, "Gradient competition: summed gradients vs batch size", units,
                        analyze,
                        description=__doc__ or "", mlp_only="its trials run on the fused/deferred MLP kernels")
