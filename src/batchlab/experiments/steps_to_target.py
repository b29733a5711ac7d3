"""Steps to a target vs batch size (Shallue et al.; McCandlish et al.).

For each batch size on a log grid (capped by the training set) the lr is tuned over a log grid
(optionally with momentum): every lr for the whole budget (`lr_search=grid`), or by successive
halving (`lr_search=halving`, `analysis.scaling.HalvingSearch`: every lr at a ninth of the
budget first, the best third at a third, ...; it ends as soon as an lr reaches the target, as
no other lr can then be faster). Each run stops when the target (test accuracy or train loss)
is reached or its epoch budget is spent. The `target_step` probe checks the target several
times an epoch, so the step count is finer than the engine's epoch-granularity stop.

Every claim is computed per seed (issue 19: a seed is the replicate): each seed's fastest lr
per batch size gives its steps S and examples E = B x S, and McCandlish's trade-off

    (S / S_min - 1)(E / E_min - 1) = 1   <=>   S(B) = S_min + E_min / B

is fitted to that seed's points (least squares on log S, positive parameters), giving
B_crit = E_min / S_min. An arm (seed, batch size) whose fastest lr reached the target only in
the last tenth of the budget, or not at all, is right-censored: excluded from the fits and
counted. A batch size whose every lr misses the target is reported with its budget and best
value.
The runs of one batch size share their batch schedule (same seed, same batch size), so a
vectorizing executor may train the lr grid together - but a probe with per-step hooks keeps a
run on its own: `--set fine_steps=false` drops the `target_step` probe (steps counted at epoch
ends, coarser) and lets the lr grid be vectorized.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from batchlab.analysis.scaling import (
    HalvingSearch,
    Outcome,
    best_per_batch,
    fit_scaling,
    outcome,
    predicted_steps,
    scaling_efficiency,
)
from batchlab.engine.result import TrainResult
from batchlab.experiments import intervals as I
from batchlab.experiments.base import QUICK_HIDDEN, Context, Experiment, Output
from batchlab.experiments.options import StepsToTarget as StepsToTargetOptions
from batchlab.experiments.outputs import md_table
from batchlab.experiments.steps_to_target_claims import (
    censored_counts,
    late_b_simple,
    per_seed_best,
    stt_claims,
    tiny_batch_claims,
)
from batchlab.experiments.work import Results, Work
from batchlab.runs.continuation import drop_states


def settings(ctx: Context) -> StepsToTargetOptions:
    """The experiment's options resolved for the preset (`options.StepsToTarget` declares the
    grids and budgets of both presets; throughput shares them)."""
    return ctx.opts


def configs(ctx: Context, s: StepsToTargetOptions, n_train: int, tiny: bool = False) -> list:
    """The grid's configs, or (`tiny`) the tiny batch's: every lr of the grid, a short budget."""
    batches = [int(s.tiny_batch)] if tiny else [b for b in s.batch_sizes if b <= n_train]
    epochs = int(s.tiny_epochs if tiny else s.max_epochs)
    return [one_config(ctx, s, bs, lr, seed, epochs)
            for bs in batches for lr in s.lrs for seed in ctx.seed_list]


def one_config(ctx: Context, s: StepsToTargetOptions, bs: int, lr: float, seed: int,
               epochs: int) -> Any:
    """One run of the grid (or the tiny batch). Its analysis reads the target's metric and
    the step it is crossed, nothing else: with a target off the train set the train set is not
    evaluated (`train_eval_size=0`), which leaves every number the same at half the
    evaluation cost (a sixth of the experiment's FLOPs at the paper preset)."""
    extra = {} if str(s.target_metric).startswith("train") else {"train_eval_size": 0}
    return ctx.config(batch_size=bs, lr=lr, momentum=s.momentum,
                      epochs=epochs, seed=seed, target_metric=s.target_metric,
                      target_value=float(s.target_value),
                      probes=["target_step"] if s.fine_steps else [], **extra)


Rows = list[dict[str, Any]]


def _row(res: TrainResult, n_train: int, budget_epochs: int) -> dict[str, Any]:
    o = outcome(res)
    return {"batch_size": res.config.batch_size, "lr": res.config.lr, "seed": res.config.seed,
            "status": res.status, "reached": o.reached, "steps_to_target": o.steps,
            "examples_to_target": o.examples, "best_value": o.best,
            # the configured budget, not the steps run (a run stops at the target); for a
            # halving search the search's whole budget (see `halving`)
            "budget_steps": budget_epochs * math.ceil(n_train / res.config.batch_size),
            "ran_epochs": res.config.epochs, "seconds_per_step": _sec_per_step(res)}


NOISE_NOTE = ("then one noise-scale run per seed at the smallest batch size that reached the "
              "target (chosen from the results): counted at the grid's smallest")


def noise_configs(ctx: Context, s: StepsToTargetOptions, batch_size: int, lr: float) -> list:
    """The noise-scale runs of G3 (`noise_check`): one per seed, the whole epoch budget with
    the noise-scale probe and no target."""
    return [ctx.config(batch_size=batch_size, lr=lr, epochs=int(s.max_epochs),
                       momentum=s.momentum, probes=["noise_scale"], seed=seed)
            for seed in ctx.seed_list]


def units(ctx: Context) -> Work:
    """The lr grid of every batch size and seed, and the tiny batch's runs (P3). With
    `lr_search=halving` the rounds after the first depend on which lrs survive, so every round
    of every search is declared as `later_runs` - the worst case, as if no lr reached the
    target early (`halving_worst`)."""
    from batchlab.engine.setup import get_data, resolve_device

    s = settings(ctx)
    probe_cfg = ctx.config()
    n_train = get_data(probe_cfg, resolve_device(probe_cfg.device)).n_train
    tiny = configs(ctx, s, n_train, tiny=True)
    # G3's noise runs depend on which batch reached the target: declared (for the plan) at
    # the grid's smallest batch and first lr, which costs the same FLOPs as any other choice
    fitting = [b for b in s.batch_sizes if b <= n_train]
    noise = noise_configs(ctx, s, min(fitting), s.lrs[0]) if fitting else []
    if s.lr_search == "halving":
        return Work("steps-to-target", later_runs=halving_worst(ctx, s, n_train) + tiny + noise,
                    notes=[NOISE_NOTE], state={"n_train": n_train})
    cfgs = configs(ctx, s, n_train)
    return Work("steps-to-target", runs=cfgs + tiny, later_runs=noise, notes=[NOISE_NOTE],
                state={"n_train": n_train, "grid": len(cfgs)})


def measure(ctx: Context, done: Results | None = None
            ) -> tuple[Rows, Rows, StepsToTargetOptions, Rows]:
    """Run (or fetch) the sweep; `done`: its declared runs already trained (else `measure`
    trains them itself, as throughput does). Returns (rows per run of the lr search, best row
    per batch size, settings, rows of the tiny batch's runs). The tiny batch (P3: batch 1
    trains poorly) is kept out of the grid's fit: its budget is short because its epochs are
    slow. `lr_search`: "grid" trains every lr for the whole budget; "halving" runs a
    successive-halving search per (batch size, seed) (`HalvingSearch`), which finds the grid's
    fastest lr whenever an lr reaches the target early and costs at most ~2.3/6 of the grid."""
    s = settings(ctx)
    work = done.work if done is not None else units(ctx)
    n_train = work.state["n_train"]
    if s.lr_search == "halving":
        tiny = configs(ctx, s, n_train, tiny=True)
        grid, tiny_rows = halving(ctx, s, n_train, tiny)
        return grid, best_from_seeds(grid, s.target_metric.endswith("loss")), s, tiny_rows
    # one call: one progress bar
    results = done.runs if done is not None else ctx.run_many(work.runs, label=work.label)
    rows = [_row(res, n_train, res.config.epochs) for res in results]
    grid = rows[:work.state["grid"]]
    return grid, best_per_batch(grid), s, rows[work.state["grid"]:]


def halving_worst(ctx: Context, s: StepsToTargetOptions, n_train: int) -> list:
    """Every round of every search of `halving`, as if no lr reached the target early: the
    most it can train (each round's surviving lrs stand in as the first n of the grid)."""
    batches = [b for b in s.batch_sizes if b <= n_train]
    lower = s.target_metric.endswith("loss")
    searches = {(b, sd): HalvingSearch(list(s.lrs), int(s.max_epochs), lower)
                for b in batches for sd in ctx.seed_list}
    return [one_config(ctx, s, b, lr, sd, ep) for (b, sd), h in searches.items()
            for n, ep in h.schedule for lr in sorted(s.lrs)[:n]]


def halving(ctx: Context, s: StepsToTargetOptions, n_train: int, tiny: list) -> tuple[Rows, Rows]:
    """One successive-halving search per (batch size, seed), their rounds trained together (one
    `run_many` per round; the tiny batch's runs go with the first). `halving_worst` declares
    the most it trains."""
    batches = [b for b in s.batch_sizes if b <= n_train]
    lower = s.target_metric.endswith("loss")
    searches = {(b, sd): HalvingSearch(list(s.lrs), int(s.max_epochs), lower)
                for b in batches for sd in ctx.seed_list}
    tiny_rows: Rows = []
    kept_ids: list[str] = []
    first = True
    while todo := [(key, lr, ep) for key, h in searches.items() for lr, ep in h.next_round()]:
        cfgs = [one_config(ctx, s, b, lr, sd, ep) for (b, sd), lr, ep in todo]
        extra = tiny if first else []
        # a survivor's next round continues this round's run (`runs.continuation`): the runs
        # of the search keep their end state unless they already have the whole budget
        results = ctx.run_many(cfgs + extra, label="steps-to-target",
                               keep_state=lambda c, mine=cfgs: c.epochs < int(s.max_epochs) and c in mine)
        kept_ids += [r.run_id for r in results[:len(cfgs)] if r.config.epochs < int(s.max_epochs)]
        if first:
            tiny_rows = [_row(r, n_train, r.config.epochs) for r in results[len(cfgs):]]
            first = False
        by: dict[tuple[int, int], Rows] = {}
        for (key, _, _), res in zip(todo, results):
            by.setdefault(key, []).append(_row(res, n_train, int(s.max_epochs)))
        for key, rs in by.items():
            searches[key].report(rs)
    # the searches are over: the states their rounds kept were for the survivors (now
    # continued) and the lrs that lost (never continued): 7.5 MB a run at the paper preset
    if ctx.store is not None:
        drop_states(ctx.store, kept_ids)
    rows = [{k: v for k, v in r.items()} for h in searches.values() for r in h.rows]
    return rows, tiny_rows


def best_from_seeds(rows: Rows, lower: bool = False) -> Rows:
    """Per batch size from a search whose lrs differ by seed: the lr most seeds chose, reached
    if every seed reached the target, with the mean of the seeds' steps (the summary's and the
    figure's row; the claims use each seed's own lr, `per_seed_best`)."""
    out = []
    per = per_seed_best(rows)
    for b in sorted({r["batch_size"] for r in rows}):
        arms = [a[b] for a in per.values() if b in a]
        lrs = [a["lr"] for a in arms if a["lr"] is not None]
        reached = bool(arms) and all(a["steps"] is not None for a in arms)
        steps = float(np.mean([a["steps"] for a in arms])) if reached else None
        vals = [r["best_value"] for r in rows if r["batch_size"] == b and r["best_value"] is not None]
        sign = -1.0 if lower else 1.0
        lr = max(set(lrs), key=lrs.count) if lrs else max(
            (r for r in rows if r["batch_size"] == b),
            key=lambda r: -math.inf if r["best_value"] is None else sign * r["best_value"])["lr"]
        out.append({"batch_size": b, "lr": lr, "reached": reached, "steps_to_target": steps,
                    "examples_to_target": steps * b if steps is not None else None,
                    "best_value": (min(vals) if lower else max(vals)) if vals else None,
                    "budget_steps": max(a["budget"] for a in arms), "seeds": len(arms)})
    return out


__all__ = ["Outcome", "best_per_batch", "fit_scaling", "outcome", "predicted_steps",
           "scaling_efficiency"]


def _sec_per_step(res: TrainResult) -> float | None:
    steps = res.final.get("steps")
    secs = res.final.get("train_seconds")
    return secs / steps if steps and secs else None


def figure(best: list[dict[str, Any]], fit: dict[str, float] | None, title: str = ""):
    import matplotlib.pyplot as plt

    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    pts = [(r["batch_size"], r["steps_to_target"]) for r in best if r["reached"]]
    miss = [(r["batch_size"], r["budget_steps"]) for r in best if not r["reached"]]
    if pts:
        b, s = map(np.asarray, zip(*pts))
        ax.loglog(b, s, "o", label="steps to target (best lr)")
        grid = np.geomspace(min(r["batch_size"] for r in best), max(r["batch_size"] for r in best), 100)
        ax.loglog(grid, s[0] * b[0] / grid, "k--", lw=1, label="perfect scaling")
        if fit:
            ax.loglog(grid, fit["s_min"] + fit["e_min"] / grid, "C1-",
                      label=f"fit: S_min={fit['s_min']:.3g}, E_min={fit['e_min']:.3g}")
            ax.axvline(fit["b_crit"], color="C1", ls=":", label=f"B_crit={fit['b_crit']:.3g}")
    if miss:
        mb, ms = zip(*miss)
        ax.loglog(mb, ms, "x", color="C3", label="not reached (budget)")
    ax.set_xlabel("batch size")
    ax.set_ylabel("steps to target")
    ax.set_title(title or "steps to target vs batch size")
    ax.legend(fontsize=8)
    lb = [(r["batch_size"], r["lr"]) for r in best if r["reached"]]
    if lb:
        ax2.loglog(*zip(*lb), "s-")
    ax2.set_xlabel("batch size")
    ax2.set_ylabel("optimal learning rate")
    ax2.set_title("tuned lr vs batch size")
    fig.tight_layout()
    return fig


def noise_check(ctx: Context, best: Rows, s: StepsToTargetOptions) -> dict[int, dict[str, Any]]:
    """seed -> B_simple along training: for every seed, the smallest batch size that reached
    the target (at its best lr, one design shared by all seeds) retrained with the noise-scale
    probe for the whole epoch budget (through the store, so once). It does not stop at the
    target, so G3 sees the noise scale over the whole fall of the loss. Per seed: `late` =
    the geometric mean of the epoch-averaged B_simple over the second half of the epochs (one
    epoch's value jumps by several x between epochs), `series` = (train loss, B_simple)."""
    reached = [r for r in best if r["reached"]]
    if not reached:
        return {}
    r0 = reached[0]
    cfgs = noise_configs(ctx, s, r0["batch_size"], r0["lr"])
    out: dict[int, dict[str, Any]] = {}
    for res in ctx.run_many(cfgs, label="steps-to-target:noise"):
        vals = [(e["epoch"], e.get("train_loss"), e.get("b_simple_avg", e.get("b_simple")))
                for e in res.epochs if e.get("b_simple_avg", e.get("b_simple")) is not None]
        vals = [v for v in vals if v[2] > 0]
        if not vals:
            continue
        late = late_b_simple([b for _, _, b in vals])
        out[res.config.seed] = {"late": late, "init": vals[0][2], "batch_size": r0["batch_size"],
                                "lr": r0["lr"], "series": [(lo, b) for _, lo, b in vals
                                                           if lo is not None and lo > 0]}
    return out


def analyze(ctx: Context, results: Results) -> Output:
    rows, best, s, tiny = measure(ctx, results)
    reached = [r for r in best if r["reached"]]
    fit = None
    if len(reached) >= 2:
        fit = fit_scaling([r["batch_size"] for r in reached], [r["steps_to_target"] for r in reached])
    ns = noise_check(ctx, best, s)
    claims = stt_claims(rows, ns) + (tiny_batch_claims(rows, tiny) if tiny else [])
    cmp = "<=" if s.target_metric.endswith("loss") else ">="
    summary = [f"{ctx.model_name()}. Target: {s.target_metric} {cmp} "
               f"{s.target_value}, budget {s.max_epochs} epochs, lr grid {s.lrs}, "
               f"momentum {s.momentum}.", "",
               md_table(best, ["batch_size", "lr", "reached", "steps_to_target",
                               "examples_to_target", "best_value", "budget_steps"])]
    if fit:
        summary.append(f"Fit S(B) = S_min + E_min/B: S_min = {fit['s_min']:.4g}, E_min = "
                       f"{fit['e_min']:.4g}, **B_crit = {fit['b_crit']:.4g}** (rms log residual "
                       f"{fit['rms_log_residual']:.3g}).")
    else:
        summary.append("Fewer than two batch sizes reached the target: no fit.")
    if tiny:
        summary.append(f"\nP3: batch {s.tiny_batch} over the same lr grid, {s.tiny_epochs} "
                       "epochs each (its steps are slow; a short budget):\n\n"
                       + md_table(tiny, ["lr", "seed", "status", "reached", "steps_to_target",
                                         "best_value", "seconds_per_step"]))
    if ns:
        v0 = next(iter(ns.values()))
        summary.append(f"\nB_simple (256 examples; per epoch the mean tr(Sigma) / mean |G|^2 of "
                       f"its probe points) along batch {v0['batch_size']}, lr {v0['lr']}, one run "
                       "per seed: " + ", ".join(f"seed {sd}: init {v['init']:.4g}, late (geometric "
                                                f"mean, second half) {v['late']:.4g}"
                                                for sd, v in sorted(ns.items())) + ".")
    cens = censored_counts(rows)
    if cens["excluded"]:
        summary.append(f"\nRight-censored (seed, batch size) arms excluded from the fits: "
                       f"{cens['excluded']} ({cens['arms']}).")
    edge = [r["batch_size"] for r in reached if r["lr"] in (min(s.lrs), max(s.lrs))]
    if edge:
        summary.append(f"\nThe best lr lies at the edge of the lr grid for batch sizes {edge}: "
                       "their steps to target may be overestimated (widen `--set lrs=[...]`).")
    missed = [r for r in best if not r["reached"]]
    for r in missed:
        summary.append(f"\nBatch {r['batch_size']}: target not reached within {r['budget_steps']} "
                       f"steps; best {s.target_metric} {r['best_value']}.")
    return Output(rows=rows, summary="\n".join(summary), claims=claims,
                  figures={"steps_vs_batch.png": figure(best, fit)},
                  study_numbers=b_crit_number(ctx, ns))


def b_crit_number(ctx: Context, ns: dict[int, dict[str, Any]]) -> list[Any]:
    """McCandlish et al.'s MNIST B_crit (~1e3 late in training) beside ours. Theirs is a value
    late in training, so ours is too: each seed's B_simple over the second half of its noise
    run (B_noise ~ B_crit, their approximation), geometric mean with a t interval over seeds.
    An early target's fitted B_crit would be a different quantity."""
    from batchlab.experiments import findings

    tpl = findings.template("G3", "critical batch size B_crit late in training",
                            "MNIST (McCandlish et al.)")
    late = [v["late"] for v in ns.values() if math.isfinite(v["late"])]
    if not late:
        return [tpl.without_match("no noise-scale run: no batch size reached the target")]
    iv = I.log_mean(late, "log late-training B_simple per seed")
    note = (f"{ctx.model_name()}, {ctx.config().dataset}: B_simple over the second half of a "
            f"{len(next(iter(ns.values()))['series'])}-epoch run per seed (B_noise ~ B_crit)")
    return [tpl.with_measurement(iv, note)]


EXPERIMENT = Experiment("steps-to-target", "Steps to target vs batch size (critical batch size)",
                        units, analyze,
                        quick_options={"hidden": QUICK_HIDDEN})
