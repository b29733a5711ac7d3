"""Sharp vs flat minimizers (Keskar et al.): small batch (64) vs large batch (10% of the training
set) on the default MLP, several seeds, with the same optimizer settings and epoch budget.

For each final model: train/test accuracy, Keskar's eps-sharpness (eps 1e-3 and 5e-4, full
space and a random 100-dim subspace), the top Hessian eigenvalue (Lanczos), the Hessian trace
(Hutchinson) on a fixed subset of the training set, the spectral density (SLQ, first seed) and
the 1-D interpolation between the small- and large-batch solutions (first seed).

The large batch trains for `large_epochs` (default 3 x `epochs`) so that both regimes reach a
similar training accuracy before they are compared (Keskar et al. train both to convergence);
a claim about test accuracy "at similar train accuracy" is inconclusive otherwise.

Options (--set): epochs, large_epochs, lr, curvature_samples, trace_samples, slq_steps,
subspace_dim.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from batchlab.engine.result import TrainResult
from batchlab.engine.setup import build_model, get_data, resolve_device
from batchlab.experiments import Claim, Context, Experiment, Output
from batchlab.experiments import verdicts_legacy as V
from batchlab.experiments.outputs import md_table, plt
from batchlab.measure import curvature as C

EPSILONS = (1e-3, 5e-4)


def final_model(res: TrainResult, epoch: int) -> torch.nn.Module:
    """The model of a (possibly cached) run with its stored weights at `epoch`."""
    cfg = res.config
    td = get_data(cfg, resolve_device(cfg.device))
    model = build_model(cfg, td).to(td.x_train.device)
    model.load_state_dict(res.checkpoint(epoch))
    return model


def run(ctx: Context) -> Output:
    o = ctx.options
    epochs = int(o.get("epochs", 30 if ctx.paper else 8))
    lr = float(o.get("lr", 0.01))
    large_epochs = int(o.get("large_epochs", 3 * epochs))
    n_curv = int(o.get("curvature_samples", 10_000 if ctx.paper else 1000))
    n_trace = int(o.get("trace_samples", 50 if ctx.paper else 8))
    slq_steps = int(o.get("slq_steps", 60 if ctx.paper else 20))
    p_sub = int(o.get("subspace_dim", 100))
    seeds = list(range(max(ctx.seeds, 2)))  # a verdict over seeds needs at least two

    probe = ctx.config(seed=0)
    n_train = get_data(probe, resolve_device(probe.device)).n_train
    batches = {"small": 64, "large": max(65, n_train // 10)}
    n_epochs = {"small": epochs, "large": large_epochs}
    configs, keys = [], []
    for seed in seeds:
        for regime, bs in batches.items():
            ep = n_epochs[regime]
            configs.append(ctx.config(batch_size=bs, lr=lr, momentum=0.9, epochs=ep,
                                      seed=seed, checkpoint_epochs=[ep], probes=[]))
            keys.append((seed, regime))
    results = ctx.run_many(configs, label="sharpness")

    rows: list[dict[str, Any]] = []
    models: dict[tuple[int, str], torch.nn.Module] = {}
    for (seed, regime), res in zip(keys, results):
        if res.status != "completed":
            rows.append({"seed": seed, "regime": regime, "status": res.status})
            continue
        model = final_model(res, res.config.epochs)
        models[(seed, regime)] = model
        td = get_data(res.config, resolve_device(res.config.device))
        data = (td.x_train[:n_curv], td.y_train[:n_curv])
        row: dict[str, Any] = {"seed": seed, "regime": regime, "batch_size": batches[regime],
                               "status": res.status, "train_acc": res.final["train_acc"],
                               "test_acc": res.final["test_acc"],
                               "train_loss": res.final["train_loss"]}
        for eps in EPSILONS:
            row[f"sharp_full_{eps:g}"] = C.sharpness(model, data, epsilon=eps).sharpness
            row[f"sharp_sub{p_sub}_{eps:g}"] = C.sharpness(
                model, data, epsilon=eps, subspace_dim=p_sub, seed=seed).sharpness
        eig = C.hessian_eigenvalues(model, data, k=1, tol=1e-3, max_iter=100, seed=seed)
        row.update(lambda_max=eig.top, lambda_converged=eig.converged,
                   lambda_residual=eig.residuals[0], lambda_hvps=eig.n_hvp)
        tr = C.hessian_trace(model, data, n_samples=n_trace, seed=seed)
        row.update(trace=tr.estimate, trace_se=tr.stderr)
        rows.append(row)
        ctx.console.log(f"sharpness seed {seed} {regime}: lambda_max {eig.top:.4g}, "
                        f"sharpness(1e-3) {row['sharp_full_0.001']:.4g}")

    ok = [r for r in rows if r.get("status") == "completed"]

    def col(regime: str, key: str) -> list[float]:
        return [r[key] for r in ok if r["regime"] == regime]

    claims = _claims(col, p_sub)
    figures = {"sharpness_bars.png": _bars(ok, p_sub)}
    s0 = seeds[0]
    if (s0, "small") in models and (s0, "large") in models:
        td = get_data(configs[0], resolve_device(configs[0].device))
        data = (td.x_train[:n_curv], td.y_train[:n_curv])
        dens = {reg: C.spectral_density(models[(s0, reg)], data, n_vectors=1, n_steps=slq_steps,
                                        seed=s0) for reg in batches}
        figures["spectral_density.png"] = _density_fig(dens, batches)
        interp = C.interpolate(models[(s0, "small")], models[(s0, "large")],
                               td.eval_sets["train"], td.eval_sets["test"],
                               list(np.linspace(-1, 2, 31)))
        figures["interpolation.png"] = _interp_fig(interp, batches)
        rows.extend({"seed": s0, "regime": "interpolation", **r} for r in interp)

    cols = ["seed", "regime", "batch_size", "train_acc", "test_acc", "sharp_full_0.001",
            "sharp_full_0.0005", f"sharp_sub{p_sub}_0.001", f"sharp_sub{p_sub}_0.0005",
            "lambda_max", "trace", "trace_se"]
    summary = (
        f"Small batch ({batches['small']}) vs large batch ({batches['large']}, 10% of the "
        f"{n_train} training samples), SGD momentum 0.9, lr {lr}, {epochs} epochs (small) "
        f"and {large_epochs} epochs (large), "
        f"seeds {seeds}. Curvature on the first {n_curv} training samples: sharpness = "
        "Keskar's 100 (max f - f(x)) / (1 + f(x)) over the box eps (|x| + 1), L-BFGS-B with "
        f"10 iterations, full space and a random {p_sub}-dim subspace; lambda_max by Lanczos "
        f"(tol 1e-3); trace by Hutchinson ({n_trace} Rademacher probes, +- standard error).\n\n"
        + md_table(ok, cols)
    )
    return Output(rows=rows, summary=summary, claims=claims, figures=figures)


def _claims(col: Any, p_sub: int) -> list[Claim]:
    claims = []
    checks = [(f"sharper-minima-{space}-{eps:g}", f"sharp_{space}_{eps:g}",
               f"eps-sharpness ({space}, eps {eps:g}) large > small")
              for space in ("full", f"sub{p_sub}") for eps in EPSILONS]
    checks.append(("larger-top-eigenvalue", "lambda_max", "top Hessian eigenvalue large > small"))
    for cid, key, what in checks:
        v, ev, rule = V.greater(col("large", key), col("small", key), 0.0, what)
        claims.append(Claim(cid, f"large batch reaches sharper minimizers ({key})", v, ev, rule))
    v, ev, rule = V.greater(col("small", "test_acc"), col("large", "test_acc"), 0.002,
                            "test accuracy small > large")
    train_gap = float(np.mean(col("small", "train_acc")) - np.mean(col("large", "train_acc")))
    ev["train_acc_gap_small_minus_large"] = train_gap
    if abs(train_gap) > 0.02 and v == V.REPRODUCED:
        v = V.INCONCLUSIVE
    rule += "; inconclusive if the train accuracies differ by more than 0.02"
    claims.append(Claim("generalization-gap",
                        "large batch has lower test accuracy at similar train accuracy",
                        v, ev, rule))
    return claims


def _bars(rows: list[dict[str, Any]], p_sub: int) -> Any:
    keys = ["sharp_full_0.001", "sharp_full_0.0005", f"sharp_sub{p_sub}_0.001",
            f"sharp_sub{p_sub}_0.0005", "lambda_max"]
    fig, axes = plt.subplots(1, len(keys), figsize=(3.2 * len(keys), 3))
    for ax, k in zip(axes, keys):
        for i, reg in enumerate(("small", "large")):
            vals = [r[k] for r in rows if r["regime"] == reg]
            ax.bar(i, np.mean(vals) if vals else 0, yerr=np.std(vals) if len(vals) > 1 else 0,
                   color=("tab:blue", "tab:red")[i])
            ax.scatter([i] * len(vals), vals, color="k", s=8, zorder=3)
        ax.set_xticks([0, 1], ["small", "large"])
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
    run=run,
    description="Keskar's eps-sharpness, Hessian spectrum and interpolation, SB vs LB.",
)
