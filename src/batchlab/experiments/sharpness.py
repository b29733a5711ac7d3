"""Sharp vs flat minimizers (Keskar et al.): small batch (64) vs large batch (10% of the training
set) on the built-in MLP (hidden 256-256 in the quick preset, the study's 1024-1024 in paper),
several seeds, with the same optimizer settings and epoch budget.

For each final model: train/test accuracy, Keskar's eps-sharpness (eps 1e-3 and 5e-4, full
space and a random 100-dim subspace), the top Hessian eigenvalue (Lanczos), the Hessian trace
(Hutch++ to a stated accuracy) on a fixed subset of the training set, the spectral density
(Krylov-deflated SLQ, first seed) and the 1-D interpolation between the small- and
large-batch solutions (first seed).

The large batch trains for `large_epochs` (default 3 x `epochs`) so that both regimes reach a
similar training accuracy before they are compared (Keskar et al. train both to convergence);
K1-K3 are decided only when both arms have converged (train-accuracy plateau) and their
train accuracies are within COMPARABLE_TOL (paired by seed); otherwise they are untestable at
this budget, with the failed premise as the reason.

K7 (the safe lr is limited by the curvature) is tested apart from the trained models, at
each seed's initial weights: lambda_max there against the largest lr that full-batch GD
survives from the same weights (`stability`).

Options (--set): `options.Sharpness` declares them with their defaults
(`batchlab experiment options sharpness`).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from batchlab.config import Phase
from batchlab.engine.setup import build_model, get_data, resolve_device
from batchlab.experiments import intervals as I
from batchlab.experiments import sharpness_units as U
from batchlab.experiments import stability as K7
from batchlab.experiments import verdicts as V
from batchlab.experiments.accuracies import accuracy_difference, bits_to_array
from batchlab.experiments.base import QUICK_HIDDEN, Context, Experiment, Output
from batchlab.experiments.claims import Claim, Gate
from batchlab.experiments.outputs import md_table, plt
from batchlab.experiments.schedules_exp import converged, learned, plateau_gain, train_rise
from batchlab.experiments.work import Curvature, Results, Work
from batchlab.measure import curvature as C
from batchlab.runs.training import load_model

EPSILONS = (1e-3, 5e-4)

COMPARABLE_TOL = 0.02
"""Keskar et al. compare minimizers at comparable train accuracy: the paired train-accuracy
difference (interval over seeds) must lie within +-this, else K1-K3 are untestable here."""


def units(ctx: Context) -> Work:
    """Small batch, large batch and the switch from large to small, every seed (at least two);
    then the curvature measurements on each final model and K7's sweeps (`work.Curvature`,
    done by `analyze` once the models exist)."""
    o = ctx.opts  # options.Sharpness, resolved for the preset
    epochs, lr, large_epochs = o.epochs, o.lr, o.large_epochs
    n_curv, trace_rtol, slq_steps = o.curvature_samples, o.trace_rtol, o.slq_steps
    p_sub, n_k7, k7_steps = o.subspace_dim, o.k7_samples, o.k7_steps
    seeds = list(range(max(ctx.seeds, 2)))  # a verdict over seeds needs at least two

    probe = ctx.config(seed=0)
    n_train = get_data(probe, resolve_device(probe.device)).n_train
    n_k7 = min(n_k7, n_train)
    big = max(65, n_train // 10)
    # "switch": the large-batch run continued at the small batch (K5: does less noise or more
    # noise decide the basin? shrinking the batch should move the large-batch solution to flat)
    batches = {"small": 64, "large": big, "switch": 64}
    n_epochs = {"small": epochs, "large": large_epochs, "switch": large_epochs + epochs}
    configs, keys = [], []
    for seed in seeds:
        for regime, bs in batches.items():
            ep = n_epochs[regime]
            sched = ([Phase(epochs=large_epochs, batch_size=big), Phase(epochs=epochs, batch_size=64)]
                     if regime == "switch" else None)
            # the long regimes are evaluated about as often as the small one (their last fifth
            # alike); "switch" as "large", whose run it continues (`runs.continuation`: every
            # epoch it evaluates within the large run's length, the large run evaluated too)
            every = max(1, n_epochs["large" if regime == "switch" else regime] // epochs)
            configs.append(ctx.config(batch_size=bs, lr=lr, momentum=0.9, epochs=ep, schedule=sched,
                                      seed=seed, checkpoint_epochs=[ep], probes=[],
                                      eval_every=every))
            keys.append((seed, regime))
    curvature = Curvature(configs[0], len(configs), n_curv, trace_rtol, slq_steps, len(ALPHAS),
                          n_k7, k7_steps, len(seeds), p_sub)
    return Work("sharpness", runs=configs, curvature=[curvature],
                state={"keys": keys, "batches": batches, "seeds": seeds, "n_train": n_train})


def analyze(ctx: Context, done: Results) -> Output:
    o = ctx.opts  # options.Sharpness, resolved for the preset
    epochs, lr, large_epochs = o.epochs, o.lr, o.large_epochs
    n_curv, trace_rtol, slq_steps = o.curvature_samples, o.trace_rtol, o.slq_steps
    p_sub, k7_steps = o.subspace_dim, o.k7_steps
    keys, batches, seeds, n_train = (done.state[k] for k in ("keys", "batches", "seeds", "n_train"))
    n_k7 = min(o.k7_samples, n_train)
    configs, results = done.work.runs, done.runs

    # every curvature measurement is a stored unit; the missing ones run as tasks (local
    # worker threads or Ray), each stored as it comes back (`sharpness_units`)
    batch = U.Batch()
    rows: list[dict[str, Any]] = []
    models: dict[tuple[int, str], torch.nn.Module] = {}
    units: dict[tuple[int, str], dict[str, int]] = {}
    for (seed, regime), res in zip(keys, results):
        if res.status != "completed":
            rows.append({"seed": seed, "regime": regime, "status": res.status})
            continue
        model = load_model(res, res.config.epochs)
        models[(seed, regime)] = model
        td = get_data(res.config, resolve_device(res.config.device))
        data = (td.x_train[:n_curv], td.y_train[:n_curv])
        units[(seed, regime)] = U.curvature_units(batch, model, data, seed, p_sub, trace_rtol,
                                                     EPSILONS)
        rows.append({"seed": seed, "regime": regime, "batch_size": batches[regime],
                     "status": res.status, "train_acc": res.final["train_acc"],
                     "test_acc": res.final["test_acc"], "train_loss": res.final["train_loss"],
                     "plateau": plateau_gain(res.epochs), "rise": train_rise(res.epochs),
                     "correct": bits_to_array(res.final.get("test_correct_bits"), ctx.test_size())})
    td = get_data(configs[0], resolve_device(configs[0].device))
    ev = [*td.eval_sets["train"], *td.eval_sets["test"]]
    pairs = [sd for sd in seeds if (sd, "small") in models and (sd, "large") in models]
    interp_at = {sd: batch.add("interpolation", [models[(sd, "small")], models[(sd, "large")]], ev,
                               {"alphas": ALPHAS}, U.interpolation, ALPHAS) for sd in pairs}
    s0 = seeds[0]
    dens_at = {}
    if s0 in pairs:
        data = (td.x_train[:n_curv], td.y_train[:n_curv])
        dens_at = {reg: batch.add("spectral-density", [models[(s0, reg)]], data,
                                  {"n_vectors": 1, "n_steps": slq_steps, "seed": s0,
                                   "deflate": U.density_split(slq_steps)[0]},
                                  U.density, slq_steps, s0) for reg in ("small", "large")}
    # K7: per seed, lambda_max at the initial weights and an lr sweep from them (one unit each)
    k7_at = {}
    for sd in seeds:
        cfg0 = ctx.config(seed=sd)
        td0 = get_data(cfg0, resolve_device(cfg0.device))
        init = build_model(cfg0, td0).to(td0.x_train.device)
        k7_at[sd] = batch.add("k7-lr-sweep", [init], (td0.x_train[:n_k7], td0.y_train[:n_k7]),
                              {"steps": k7_steps, "grid": [K7.GRID_LOW, K7.GRID_HIGH, K7.PER_OCTAVE],
                               "blowup": K7.BLOWUP, "seed": sd}, K7.sweep, sd, k7_steps)
    got = batch.run(ctx)
    k7 = [{"seed": sd, **got[i]} for sd, i in k7_at.items()]
    for s in k7:
        ctx.log(f"sharpness K7 seed {s['seed']}: lambda_max {s['lambda_max']}, lr_max "
                f"{s['lr_max']}, first diverged {s['lr_diverged']}, ratio {s['ratio']}")
    for row in rows:
        if (row["seed"], row["regime"]) in units:
            row.update(U.curvature_row(units[(row["seed"], row["regime"])], got))
            ctx.log(f"sharpness seed {row['seed']} {row['regime']}: lambda_max "
                    f"{row['lambda_max']:.4g}, sharpness(1e-3) {row['sharp_full_0.001']:.4g}")
    ok = [r for r in rows if r.get("status") == "completed"]
    interp = {sd: got[i]["rows"] for sd, i in interp_at.items()}
    claims = sharpness_claims(ok, interp, p_sub, ctx.test_size(), k7,
                              f"from the seed's initial weights, first {n_k7} training examples, "
                              f"{k7_steps} steps per lr")
    figures = {"sharpness_bars.png": _bars(ok, p_sub)}
    if dens_at:
        dens = {reg: _spectral(got[i]) for reg, i in dens_at.items()}
        figures["spectral_density.png"] = _density_fig(dens, batches)
        figures["interpolation.png"] = _interp_fig(interp[s0], batches)
        rows.extend({"seed": s0, "regime": "interpolation", **r} for r in interp[s0])

    cols = ["seed", "regime", "batch_size", "train_acc", "test_acc", "sharp_full_0.001",
            "sharp_full_0.0005", f"sharp_sub{p_sub}_0.001", f"sharp_sub{p_sub}_0.0005",
            "lambda_max", "trace", "trace_se", "trace_hvps"]
    summary = (
        f"{ctx.model_name()}. Small batch ({batches['small']}) vs large batch ({batches['large']}, 10% of the "
        f"{n_train} training samples), SGD momentum 0.9, lr {lr}, {epochs} epochs (small) "
        f"and {large_epochs} epochs (large), "
        f"seeds {seeds}. Curvature on the first {n_curv} training samples: sharpness = "
        "Keskar's 100 (max f - f(x)) / (1 + f(x)) over the box eps (|x| + 1), L-BFGS-B with "
        f"10 iterations, full space and a random {p_sub}-dim subspace; lambda_max by Lanczos "
        f"(tol 1e-3); trace by Hutch++ stopped when its 95% interval is within {trace_rtol:.0%} "
        "(+- standard error; trace_hvps: the products it took).\n\n"
        + md_table(ok, cols) + "\n\n" + K7.summary(k7, n_k7, k7_steps)
    )
    for r in rows:
        r.pop("correct", None)  # per-example bits: in the claims' intervals, not in rows.csv
    return Output(rows=rows, summary=summary, claims=claims, figures=figures)


ALPHAS = [float(a) for a in np.linspace(-1, 2, 31)]


def _spectral(got: dict[str, Any]) -> C.SpectralDensity:
    """A stored SLQ spectral density (one list per quadrature rule in the row; the deflated
    block's rule is longer than the probes') as the measure's type."""
    rows = got["nodes"]
    m = max(len(r) for r in rows)
    nodes = np.full((len(rows), m), np.nan)
    weights = np.zeros((len(rows), m))
    for i, (r, w) in enumerate(zip(rows, got["weights"])):
        nodes[i, : len(r)], weights[i, : len(w)] = r, w
    return C.SpectralDensity(grid=np.asarray(got["grid"]), density=np.asarray(got["density"]),
                             nodes=nodes, weights=weights, sigma=float(got["sigma"]),
                             mass=np.asarray(got["mass"]) if got.get("mass") else None,
                             deflated=int(got.get("deflated", 0)),
                             w1_bound=float(got.get("w1_bound", 0.0)))


def premise(ok: list[dict[str, Any]]) -> list[Gate]:
    """K1-K3's premise: both arms converged (train-accuracy plateau) and at comparable train
    accuracy (paired by seed). A large batch stopped early is sharper and worse for being
    undertrained, which is not Keskar's claim, so the claims are then untestable."""
    def col(regime: str, key: str) -> list[Any]:
        return [r.get(key) for r in sorted(ok, key=lambda r: r["seed"]) if r["regime"] == regime]

    return [converged("small", col("small", "plateau")), learned("small", col("small", "rise")),
            converged("large", col("large", "plateau")), learned("large", col("large", "rise")),
            Gate("comparable train accuracy", "train accuracy small - large batch, paired by seed",
                 I.difference(col("small", "train_acc"), col("large", "train_acc")),
                 V.within(COMPARABLE_TOL))]


def sharpness_claims(ok: list[dict[str, Any]], interp: dict[int, list[dict[str, float]]],
                     p_sub: int, n_test: int, k7: list[dict[str, Any]] | None = None,
                     k7_where: str = "") -> list[Claim]:
    """K1-K5 from the final models' measurements (one row per seed and regime) and K7 from
    one lr sweep per seed (`stability.sweep`; None: not run, unmeasured). n is always the number
    of training seeds: every interval is over one value per seed (paired by seed where two arms
    are compared)."""
    ok = sorted(ok, key=lambda r: r["seed"])
    both = sorted({r["seed"] for r in ok if r["regime"] == "small"}
                  & {r["seed"] for r in ok if r["regime"] == "large"})

    def col(regime: str, key: str, seeds: list[int] | None = None) -> list[Any]:
        return [r.get(key) for r in ok if r["regime"] == regime
                and (seeds is None or r["seed"] in seeds)]

    gates = premise([r for r in ok if r["seed"] in both])
    # K2 ("converge to sharp minimizers") needs both arms converged - an arm still moving is
    # measured mid-sharpening - but not equal train accuracy, which is K1's and K3's premise
    conv = gates[:4]  # converged and learned, both arms (the last gate is comparability)
    out = [
        Claim("generalization-gap", "K1", "the large batch has a lower test accuracy (at "
              "comparable train accuracy, both converged)",
              accuracy_difference(col("small", "test_acc", both), col("large", "test_acc", both),
                                  n_test, correct_a=col("small", "correct", both),
                                  correct_b=col("large", "correct", both)), V.above(0.0),
              "test accuracy small - large batch, paired by seed on the shared test set",
              {"small": col("small", "test_acc", both), "large": col("large", "test_acc", both)},
              primary=True, gates=gates),
        Claim("comparable-train-accuracy", "K1", "... at comparable train accuracy (within "
              f"{COMPARABLE_TOL:g})",
              I.difference(col("small", "train_acc", both), col("large", "train_acc", both)),
              V.within(COMPARABLE_TOL), "train accuracy small - large batch, paired by seed",
              {"small": col("small", "train_acc", both), "large": col("large", "train_acc", both)},
              reading="the condition under which K1's comparison is fair (part of the claim)",
              primary=True),
        Claim("larger-top-eigenvalue", "K2", "the large batch reaches a sharper minimizer (top "
              "Hessian eigenvalue)",
              I.ratio(col("large", "lambda_max", both), col("small", "lambda_max", both)),
              V.above(1.0), "lambda_max large / small (geometric mean over seeds)",
              {"large": col("large", "lambda_max", both), "small": col("small", "lambda_max", both)},
              reading="curvature: the top Hessian eigenvalue", primary=True, gates=conv),
    ]
    for space in ("full", f"sub{p_sub}"):
        for eps in EPSILONS:
            key = f"sharp_{space}_{eps:g}"
            out.append(Claim(
                f"sharper-minima-{space}-{eps:g}", "K2", f"the large batch is sharper by Keskar's "
                f"eps-sharpness ({space} space, eps {eps:g})",
                I.ratio(col("large", key, both), col("small", key, both)), V.above(1.0),
                f"eps-sharpness large / small ({space}, eps {eps:g}), geometric mean over seeds",
                {"large": col("large", key, both), "small": col("small", key, both)},
                reading=f"Keskar's eps-sharpness, {space} space, eps {eps:g}", primary=False,
                gates=conv))
    # K3 per seed: Kendall tau of (lambda_max, gap) over that seed's models, interval over seeds
    series = []
    for sd in sorted({r["seed"] for r in ok}):
        mine = [r for r in ok if r["seed"] == sd]
        series.append(([r["lambda_max"] for r in mine],
                       [r["train_acc"] - r["test_acc"] for r in mine]))
    out.append(Claim("sharpness-vs-gap", "K3", "sharper minimizers have larger generalization gaps",
                     I.correlation(series), V.above(0.0),
                     "Kendall tau(lambda_max, train - test accuracy) over one seed's models "
                     "(small, large, switched), interval over seeds",
                     {"per_seed": [{"lambda_max": x, "gap": y} for x, y in series]},
                     primary=True, gates=gates))
    rises = []  # per seed: (rise beyond the large-batch end, rise beyond the small-batch end)
    for rows in interp.values():
        loss = {round(r["alpha"], 3): r["train_loss"] for r in rows}
        rises.append((loss[1.5] - loss[1.0], loss[-0.5] - loss[0.0]))
    # the difference is defined even when a short run leaves the small-batch end off its
    # minimum (its side then falls: a negative rise), where a log ratio would drop the seed
    out.append(Claim("large-basin-steeper", "K4", "on the line through both solutions the "
                     "large-batch minimizer sits in a steeper, narrower basin",
                     I.replicate_mean([a - b for a, b in rises], what="rise differences"),
                     V.above(0.0),
                     "train-loss rise 0.5 (x the distance between the solutions) beyond the "
                     "large-batch end - the same beyond the small-batch end, one per seed",
                     {"rises_large_small": rises}))
    sw = sorted({r["seed"] for r in ok if r["regime"] == "switch"}
                & {r["seed"] for r in ok if r["regime"] == "large"})
    out.append(Claim("noise-flattens", "K5", "continuing a large-batch run at a small batch (more "
                     "gradient noise) moves it to a flatter minimizer",
                     I.ratio(col("switch", "lambda_max", sw), col("large", "lambda_max", sw)),
                     V.below(1.0),
                     "lambda_max after switching to batch 64 / lambda_max of the large batch, "
                     "paired by seed", {"switch": col("switch", "lambda_max", sw),
                                        "large": col("large", "lambda_max", sw)},
                     reading="noise by shrinking the batch (not by injecting Gaussian noise)"))
    out.append(K7.k7_claim(k7, k7_where))
    return out


def _bars(rows: list[dict[str, Any]], p_sub: int) -> Any:
    keys = ["sharp_full_0.001", "sharp_full_0.0005", f"sharp_sub{p_sub}_0.001",
            f"sharp_sub{p_sub}_0.0005", "lambda_max"]
    fig, axes = plt.subplots(1, len(keys), figsize=(3.2 * len(keys), 3))
    for ax, k in zip(axes, keys):
        for i, reg in enumerate(("small", "large", "switch")):
            vals = [r[k] for r in rows if r["regime"] == reg]
            ax.bar(i, np.mean(vals) if vals else 0, yerr=np.std(vals) if len(vals) > 1 else 0,
                   color=("tab:blue", "tab:red", "tab:green")[i])
            ax.scatter([i] * len(vals), vals, color="k", s=8, zorder=3)
        ax.set_xticks([0, 1, 2], ["small", "large", "switch"])
        ax.set_title(k, fontsize=9)
    fig.tight_layout()
    return fig


def _density_fig(dens: dict[str, C.SpectralDensity], batches: dict[str, int]) -> Any:
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for reg, d in dens.items():
        ax.semilogy(d.grid, np.maximum(d.density, 1e-12), label=f"{reg} batch ({batches[reg]})")
    ax.set_xlabel("eigenvalue")
    ax.set_ylabel("density (SLQ)")
    ax.set_ylim(bottom=1e-8)
    ax.legend()
    fig.tight_layout()
    return fig


def _interp_fig(rows: list[dict[str, float]], batches: dict[str, int]) -> Any:
    a = [r["alpha"] for r in rows]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.semilogy(a, [r["train_loss"] for r in rows], "b-", label="train loss")
    ax.semilogy(a, [r["test_loss"] for r in rows], "b--", label="test loss")
    ax.set_xlabel(f"alpha (0 = small batch {batches['small']}, 1 = large batch "
                  f"{batches['large']})")
    ax.set_ylabel("loss")
    ax2 = ax.twinx()
    ax2.plot(a, [r["train_acc"] for r in rows], "r-", label="train acc")
    ax2.plot(a, [r["test_acc"] for r in rows], "r--", label="test acc")
    ax2.set_ylabel("accuracy")
    fig.legend(loc="upper center", ncol=4, fontsize=8)
    fig.tight_layout()
    return fig


EXPERIMENT = Experiment(
    name="sharpness",
    title="Sharpness of small- vs large-batch minimizers",
    units=units,
    analyze=analyze,
    description="Keskar's eps-sharpness, Hessian spectrum and interpolation, SB vs LB.",
    quick_options={"hidden": QUICK_HIDDEN},
)
