"""Steps to a target vs batch size (Shallue et al.; McCandlish et al.).

For each batch size on a log grid (capped by the training set) the lr is tuned over a log grid
(optionally with momentum); each run stops when the target (test accuracy or train loss) is
reached or its epoch budget is spent. The `target_step` probe checks the target several times
an epoch, so the step count is finer than the engine's epoch-granularity stop. Per batch size
the best lr's steps S and examples E = B x S are kept and McCandlish's trade-off

    (S / S_min - 1)(E / E_min - 1) = 1   <=>   S(B) = S_min + E_min / B

is fitted (least squares on log S, positive parameters), giving B_crit = E_min / S_min.
A batch size whose every lr misses the target is reported with its budget and best value.
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
    Outcome,
    best_per_batch,
    fit_scaling,
    outcome,
    predicted_steps,
    scaling_efficiency,
)
from batchlab.engine.result import TrainResult
from batchlab.experiments import Context, Experiment, Output
from batchlab.experiments import verdicts as V
from batchlab.experiments.base import QUICK_HIDDEN
from batchlab.experiments.claims import Claim
from batchlab.experiments.outputs import md_table

QUICK = dict(batch_sizes=[16, 64, 256, 1024], lrs=[0.03, 0.1, 0.3, 1.0], max_epochs=15,
             target_metric="test_acc", target_value=0.90, tiny_batch=1, tiny_epochs=2)
PAPER = dict(batch_sizes=[16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192],
             lrs=[0.01, 0.03, 0.1, 0.3, 1.0, 3.0], max_epochs=60,
             target_metric="test_acc", target_value=0.97, tiny_batch=1, tiny_epochs=5)


def settings(ctx: Context) -> dict[str, Any]:
    s = dict(PAPER if ctx.paper else QUICK, fine_steps=True)
    s.update({k: v for k, v in ctx.options.items() if k in
              ("batch_sizes", "lrs", "max_epochs", "target_metric", "target_value", "momentum",
               "hidden", "fine_steps", "tiny_batch", "tiny_epochs")})
    return s


def configs(ctx: Context, s: dict[str, Any], n_train: int, tiny: bool = False) -> list:
    """The grid's configs, or (`tiny`) the tiny batch's: every lr of the grid, a short budget."""
    extra = {"hidden": s["hidden"]} if "hidden" in s else {}
    batches = [int(s["tiny_batch"])] if tiny else [b for b in s["batch_sizes"] if b <= n_train]
    epochs = int(s["tiny_epochs"] if tiny else s["max_epochs"])
    out = []
    for bs in batches:
        for lr in s["lrs"]:
            for seed in ctx.seed_list:
                out.append(ctx.config(batch_size=bs, lr=lr, momentum=float(s.get("momentum", 0.0)),
                                      epochs=epochs, seed=seed,
                                      target_metric=s["target_metric"],
                                      target_value=float(s["target_value"]),
                                      probes=["target_step"] if s["fine_steps"] else [],
                                      **extra))
    return out


Rows = list[dict[str, Any]]


def measure(ctx: Context) -> tuple[Rows, Rows, dict[str, Any], Rows]:
    """Run (or fetch) the sweep. Returns (rows per run of the grid, best row per batch size,
    settings, rows of the tiny batch's runs). The tiny batch (P3: batch 1 trains poorly) is
    kept out of the grid's fit: its budget is short because its epochs are slow."""
    from batchlab.engine.setup import get_data, resolve_device

    s = settings(ctx)
    probe_cfg = ctx.config()
    n_train = get_data(probe_cfg, resolve_device(probe_cfg.device)).n_train
    cfgs = configs(ctx, s, n_train)
    tiny = configs(ctx, s, n_train, tiny=True)
    results = ctx.run_many(cfgs + tiny, label="steps-to-target")  # one call: one plan, one bar
    rows = []
    for res in results:
        o = outcome(res)
        rows.append({"batch_size": res.config.batch_size, "lr": res.config.lr,
                     "seed": res.config.seed, "status": res.status, "reached": o.reached,
                     "steps_to_target": o.steps, "examples_to_target": o.examples,
                     "best_value": o.best, "budget_steps": o.budget_steps,
                     "seconds_per_step": _sec_per_step(res)})
    grid = rows[:len(cfgs)]
    return grid, best_per_batch(grid), s, rows[len(cfgs):]


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


def noise_check(ctx: Context, best: list[dict[str, Any]], s: dict[str, Any]) -> dict[str, Any] | None:
    """B_simple along the smallest reached batch size's best run, retrained with the
    noise-scale probe for the whole epoch budget (through the store, so once). It does not stop
    at the target, so G3 sees the noise scale over the whole fall of the loss (a run stopped at
    the target has two or three epochs); G2 reads B_simple at the first epoch past the target."""
    reached = [r for r in best if r["reached"]]
    if not reached:
        return None
    r0 = reached[0]
    extra = {"hidden": s["hidden"]} if "hidden" in s else {}
    cfg = ctx.config(batch_size=r0["batch_size"], lr=r0["lr"], epochs=int(s["max_epochs"]),
                     momentum=float(s.get("momentum", 0.0)), probes=["noise_scale"], seed=0,
                     **extra)
    res = ctx.run_many([cfg], label="steps-to-target:noise")[0]
    vals = [(e["epoch"], e.get("b_simple_avg", e.get("b_simple"))) for e in res.epochs
            if e.get("b_simple_avg", e.get("b_simple")) is not None]
    if not vals:
        return None
    metric, target = s["target_metric"], float(s["target_value"])
    lower = metric.endswith("loss")

    def hit(e: dict[str, Any]) -> bool:
        v = e.get(metric)
        return isinstance(v, (int, float)) and (v <= target if lower else v >= target)

    at = next((e["epoch"] for e in res.epochs if e["epoch"] >= 1 and hit(e)), None)
    b_at = dict(vals).get(at) if at is not None else None
    loss = {e["epoch"]: e.get("train_loss") for e in res.epochs}
    return {"b_simple_init": vals[0][1], "b_simple_at_target": b_at,
            "epoch_at_target": at, "batch_size": r0["batch_size"], "lr": r0["lr"],
            "series": [(loss.get(ep), b) for ep, b in vals]}


def per_seed_steps(rows: list[dict[str, Any]], best: list[dict[str, Any]]) -> dict[int, dict[int, float]]:
    """seed -> {batch size: steps to target at that batch size's best lr} (reached only)."""
    out: dict[int, dict[int, float]] = {}
    for b in best:
        if not b["reached"]:
            continue
        for r in rows:
            if r["batch_size"] == b["batch_size"] and r["lr"] == b["lr"] and r["reached"]:
                out.setdefault(r["seed"], {})[r["batch_size"]] = float(r["steps_to_target"])
    return out


def stt_claims(rows: list[dict[str, Any]], best: list[dict[str, Any]],
               ns: dict[str, Any] | None) -> list[Claim]:
    """G1 (the S(B) model fits; perfect then diminishing scaling), G2 (B_simple ~ B_crit),
    G3 (noise scale grows as the loss falls), and the tuned lr's growth, from per-seed steps."""
    seeds = per_seed_steps(rows, best)
    fits = {sd: fit_scaling(list(st), list(st.values())) for sd, st in seeds.items() if len(st) >= 3}
    out = [Claim("model-fits", "G1", "steps to target follow S = S_min (1 + B_crit / B)",
                 V.mean_interval([f["rms_log_residual"] for f in fits.values()]), V.below(0.2),
                 "rms log residual of the S(B) fit per seed (0.2 = steps explained within ~20%)",
                 {"fits": fits}, primary=True)]
    effs = [[(st[b1] / st[b2]) / (b2 / b1) for b1, b2 in zip(sorted(st), sorted(st)[1:])]
            for st in seeds.values() if len(st) >= 2]
    if effs and all(len(e) == len(effs[0]) for e in effs):
        out.append(Claim("perfect-scaling", "G1", "at small batch sizes a larger batch cuts the "
                         "steps to target almost proportionally", V.mean_interval([e[0] for e in effs]),
                         V.above(0.5), "scaling efficiency (S1/S2)/(B2/B1) of the first increase",
                         {"efficiencies": effs}, primary=False))
        if len(effs[0]) >= 2:
            out.append(Claim("diminishing-returns", "G1", "scaling efficiency falls at large batch "
                             "sizes", V.difference([e[0] for e in effs], [e[-1] for e in effs]),
                             V.above(0.0), "efficiency of the first - of the last increase",
                             {"efficiencies": effs}, primary=False))
    reached = [r for r in best if r["reached"]]
    if len(reached) >= 3:
        out.append(Claim("lr-grows", "S2", "the tuned learning rate grows with the batch size",
                         V.correlation([r["batch_size"] for r in reached], [r["lr"] for r in reached]),
                         V.above(0.5), "Spearman rho(batch size, tuned lr)",
                         {"tuned": [(r["batch_size"], r["lr"]) for r in reached]},
                         reading="Shallue et al.'s tuned-lr reading of 'a larger lr compensates'",
                         primary=False))
    logs = [math.log(f["b_crit"] / ns["b_simple_at_target"]) for f in fits.values()
            if ns and ns.get("b_simple_at_target") and f["b_crit"] > 0]
    out.append(Claim("noise-scale-predicts", "G2", "B_simple at the target predicts the fitted "
                     "critical batch size (within a factor 5)",
                     V.mean_interval(logs).map(math.exp, "exp of a t interval of log ratios over seeds"),
                     V.between(0.2, 5.0), "B_crit (fit per seed) / B_simple at the target",
                     {"b_crit": [f["b_crit"] for f in fits.values()],
                      "b_simple": (ns or {}).get("b_simple_at_target")}))
    pts = [(lo, b) for lo, b in (ns or {}).get("series", []) if lo is not None and b is not None]
    out.append(Claim("noise-grows", "G3", "the noise scale grows as the loss falls",
                     V.correlation([lo for lo, _ in pts], [b for _, b in pts]), V.below(-0.5),
                     "Spearman rho(train loss, B_simple) over the epochs of one run",
                     {"series": pts}))
    return out


def _seconds(r: dict[str, Any]) -> tuple[float, bool] | None:
    """(wall seconds to the target, exact?) of one run: measured steps x its measured seconds
    per step; a run that missed the target gives its whole budget, a lower bound."""
    sps = r.get("seconds_per_step")
    if not sps or r["status"] != "completed":
        return None
    if r["reached"]:
        return float(r["steps_to_target"]) * sps, True
    return float(r["budget_steps"]) * sps, False


def tiny_batch_claims(rows: Rows, tiny: Rows) -> list[Claim]:
    """P3 from the tiny batch's runs (every lr of the grid) and the grid's, paired by seed."""
    ratios, bounded, reach = [], True, []
    small = min((r["batch_size"] for r in rows), default=None)
    for seed in sorted({r["seed"] for r in tiny}):
        grid = [t for r in rows if r["seed"] == seed and r["reached"] and (t := _seconds(r))]
        own = [t for r in tiny if r["seed"] == seed and (t := _seconds(r))]
        if grid and own:
            # the fastest tiny run: if its time is exact, every missed run's (true) time is
            # above it, so the minimum is exact; if it is a missed run's bound, it is a bound
            best_tiny = min(own)
            ratios.append(math.log(best_tiny[0] / min(g[0] for g in grid)))
            bounded = bounded and best_tiny[1]
        frac = lambda rs: float(np.mean([r["reached"] for r in rs])) if rs else math.nan  # noqa: E731
        reach.append(frac([r for r in rows if r["seed"] == seed and r["batch_size"] == small])
                     - frac([r for r in tiny if r["seed"] == seed]))
    iv = V.mean_interval(ratios).map(math.exp, "exp of a t interval of per-seed log ratios")
    if not bounded:  # a missed target's time is a lower bound: nothing bounds the ratio above
        iv = V.Interval(iv.estimate, iv.lo, math.inf, iv.n, iv.method + "; tiny batch missed "
                        "the target in a seed, so its time is a lower bound and hi is open")
    b1 = tiny[0]["batch_size"] if tiny else None
    return [
        Claim("tiny-batch-slow", "P3", f"batch {b1} is slow to converge: its wall time to the "
              "target (best lr) exceeds the fastest batch size's", iv, V.above(1.0),
              f"seconds to target at batch {b1} / at the fastest (batch, lr) of the grid, per seed "
              "(measured steps x measured seconds per step)",
              {"log_ratios": ratios, "tiny": [(r["lr"], r["seed"], r["reached"], _seconds(r))
                                              for r in tiny]}, primary=True),
        Claim("tiny-batch-unstable", "P3", f"batch {b1} is unstable: fewer lrs of the grid "
              f"reach the target than at batch {small}", V.mean_interval(reach), V.above(0.0),
              f"fraction of the lr grid reaching the target at batch {small} - at batch {b1} "
              "(the tiny batch's budget is shorter: see the summary)", {"differences": reach},
              reading="instability as a narrower range of workable lrs", primary=False),
    ]


def run(ctx: Context) -> Output:
    rows, best, s, tiny = measure(ctx)
    reached = [r for r in best if r["reached"]]
    fit = None
    if len(reached) >= 2:
        fit = fit_scaling([r["batch_size"] for r in reached], [r["steps_to_target"] for r in reached])
    ns = noise_check(ctx, best, s)
    claims = stt_claims(rows, best, ns) + (tiny_batch_claims(rows, tiny) if tiny else [])
    cmp = "<=" if s["target_metric"].endswith("loss") else ">="
    summary = [f"{ctx.model_name()}. Target: {s['target_metric']} {cmp} "
               f"{s['target_value']}, budget {s['max_epochs']} epochs, lr grid {s['lrs']}, "
               f"momentum {s.get('momentum', 0.0)}.", "",
               md_table(best, ["batch_size", "lr", "reached", "steps_to_target",
                               "examples_to_target", "best_value", "budget_steps"])]
    if fit:
        summary.append(f"Fit S(B) = S_min + E_min/B: S_min = {fit['s_min']:.4g}, E_min = "
                       f"{fit['e_min']:.4g}, **B_crit = {fit['b_crit']:.4g}** (rms log residual "
                       f"{fit['rms_log_residual']:.3g}).")
    else:
        summary.append("Fewer than two batch sizes reached the target: no fit.")
    if tiny:
        summary.append(f"\nP3: batch {s['tiny_batch']} over the same lr grid, {s['tiny_epochs']} "
                       "epochs each (its steps are slow; a short budget):\n\n"
                       + md_table(tiny, ["lr", "seed", "status", "reached", "steps_to_target",
                                         "best_value", "seconds_per_step"]))
    if ns and ns.get("b_simple_at_target") is not None:
        summary.append(f"\nB_simple (256 examples; in the target epoch the mean tr(Sigma) / mean "
                       f"|G|^2 of its probe points) at init {ns['b_simple_init']:.4g}, at the target "
                       f"(epoch {ns['epoch_at_target']}, batch {ns['batch_size']}, lr {ns['lr']}) "
                       f"{ns['b_simple_at_target']:.4g}.")
    edge = [r["batch_size"] for r in reached if r["lr"] in (min(s["lrs"]), max(s["lrs"]))]
    if edge:
        summary.append(f"\nThe best lr lies at the edge of the lr grid for batch sizes {edge}: "
                       "their steps to target may be overestimated (widen `--set lrs=[...]`).")
    missed = [r for r in best if not r["reached"]]
    for r in missed:
        summary.append(f"\nBatch {r['batch_size']}: target not reached within {r['budget_steps']} "
                       f"steps; best {s['target_metric']} {r['best_value']}.")
    return Output(rows=rows, summary="\n".join(summary), claims=claims,
                  figures={"steps_vs_batch.png": figure(best, fit)},
                  study_numbers=b_crit_number(ctx, rows, best, s))


def b_crit_number(ctx: Context, rows: Rows, best: Rows, s: dict[str, Any]) -> list[Any]:
    """McCandlish et al.'s MNIST B_crit (~1e3 late in training) beside ours: the fitted
    B_crit of each seed's steps to target, geometric mean with a t interval over seeds."""
    from batchlab.experiments import findings

    logs = [math.log(f["b_crit"]) for st in per_seed_steps(rows, best).values()
            if len(st) >= 3 and (f := fit_scaling(list(st), list(st.values())))["b_crit"] > 0]
    if not logs:
        return []
    iv = V.mean_interval(logs).map(math.exp, "exp of a t interval of per-seed log B_crit")
    cmp = "<=" if s["target_metric"].endswith("loss") else ">="
    note = (f"{ctx.model_name()}, {ctx.config().dataset}, fit of steps to {s['target_metric']} "
            f"{cmp} {s['target_value']} (the source's B_crit is for a loss late in training)")
    return [findings.template("G3", "critical batch size B_crit late in training",
                              "MNIST (McCandlish et al.)").with_measurement(iv, note)]


EXPERIMENT = Experiment("steps-to-target", "Steps to target vs batch size (critical batch size)", run,
                        quick_options={"hidden": QUICK_HIDDEN})
