"""Step lengths across batch sizes (Gao & Zhong's structural measurements): per optimizer step,
the gradient norm, the parameter-update length and the loss-update length, averaged per epoch,
and the top Hessian eigenvalue of each layer's block over training (probe `steplengths`).

Plain SGD at one lr for every batch size (the study's setting: only the batch size changes).
Also, at each run's final weights: minibatch-gradient direction and spread vs the full
gradient (P4, K6), LARS's secant curvature vs the Hessian's per layer (C6), and what batch
normalization keeps at batch size 1 (P6). Options: `batchlab experiment options step-lengths`.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from batchlab.experiments import intervals as I
from batchlab.experiments import verdicts as V
from batchlab.experiments.base import Context, Experiment, Output
from batchlab.experiments.claims import Claim
from batchlab.experiments.outputs import md_table, plt
from batchlab.experiments.work import Results, Work

METRICS = ("step_grad_norm", "step_update_norm", "step_loss_update")


def units(ctx: Context) -> Work:
    """Plain SGD at every batch size and seed, with the step-length probes. (The measurements
    at the final weights, `_gradient_quality`, are a few forward and backward passes per run:
    not declared as work of their own.)"""
    o = ctx.opts  # options.StepLengths, resolved for the preset
    configs = [ctx.config(batch_size=b, epochs=o.epochs, lr=o.lr, seed=s,
                          checkpoint_epochs=[o.epochs], probes=["geometry", "steplengths"])
               for b in o.batch_sizes for s in ctx.seed_list]
    return Work("step-lengths", runs=configs)


def analyze(ctx: Context, work: Results) -> Output:
    o = ctx.opts  # options.StepLengths, resolved for the preset
    sizes, epochs, lr = list(o.batch_sizes), o.epochs, o.lr
    seeds = ctx.seed_list
    configs, results = work.work.runs, work.runs
    rows: list[dict[str, Any]] = []
    for cfg, res in zip(configs, results):
        for e in res.epochs[1:]:
            rows.append({"batch_size": cfg.batch_size, "seed": cfg.seed, "epoch": e["epoch"],
                         "test_acc": e.get("test_acc"),
                         **{k: v for k, v in e.items()
                            if k in METRICS or k.startswith("curv_layer")}})
    per_run = [{"batch_size": c.batch_size, "seed": c.seed,
                **{m: float(np.nanmean([r.get(m, np.nan) for r in rows
                                        if r["batch_size"] == c.batch_size and r["seed"] == c.seed]))
                   for m in METRICS}} for c in configs]
    means = [{"batch_size": b, **{m: float(np.nanmean([r[m] for r in per_run if r["batch_size"] == b]))
                                  for m in METRICS}} for b in sizes]
    quality = _gradient_quality(ctx, configs, results, epochs)
    claims = step_claims(per_run, quality)
    summary = (f"Plain SGD, lr {lr}, {epochs} epochs, batch sizes {sizes}, seeds {seeds}. "
               "Means over all recorded steps (every 5th step). Under plain SGD the update "
               "length is lr x the gradient norm, so it is shown but not counted as a separate "
               "finding.\n\n" + md_table(means, ["batch_size", *METRICS])
               + "\n## Minibatch gradients at the final weights\n\n"
               + md_table(quality["table"], ["batch_size", "cosine_to_full", "deviation_norm"])
               + f"\nBatchNorm signal kept at batch 1: {quality['bn_signal_1']:.3g}; at batch "
               f"64: {quality['bn_signal_64']:.3g} (fraction of the input variance).\n")
    return Output(rows=rows + quality["rows"], summary=summary, claims=claims, figures={
        "step_lengths.png": _figure(rows, sizes)})


def _gradient_quality(ctx: Context, configs: list, results: list, epochs: int) -> dict[str, Any]:
    """Minibatch-gradient direction and spread, LARS's secant vs Hessian curvature per layer,
    and batch normalization's signal: measured at each run's final weights."""
    from batchlab.engine.setup import get_data, resolve_device
    from batchlab.measure import minibatch
    from batchlab.measure.curvature import hessian_eigenvalues
    from batchlab.runs.training import load_model

    probe_sizes = [1, 4, 16, 64, 256]
    out: dict[str, Any] = {"rows": [], "cos": {}, "dev": {}, "secant": [], "lam": [],
                           "per_seed": {}}  # seed -> {"cos": {b: mean}, "dev": ..., layers}
    for cfg, res in zip(configs, results):
        if res.status != "completed" or cfg.batch_size != configs[0].batch_size:
            continue  # the runs of the smallest batch size are enough for the point measures
        model = load_model(res, epochs)
        td = get_data(cfg, resolve_device(cfg.device))
        x, y = td.x_train[:2048], td.y_train[:2048]
        sizes = [b for b in probe_sizes if b <= len(y) // 2]
        mine: dict[str, Any] = {"cos": {}, "dev": {}, "secant": [], "lam": []}
        out["per_seed"][cfg.seed] = mine
        for q in minibatch.gradient_quality(model, x, y, sizes, draws=16, seed=cfg.seed):
            # the 16 draws are summarised inside the seed: one mean per batch size
            mine["cos"][q.batch_size] = float(np.mean(q.cosines))
            mine["dev"][q.batch_size] = float(np.mean(q.deviations))
            out["cos"].setdefault(q.batch_size, []).extend(q.cosines)
            out["dev"].setdefault(q.batch_size, []).extend(q.deviations)
            out["rows"].append({"kind": "gradient_quality", "seed": cfg.seed, "batch_size": q.batch_size,
                                "cosine_to_full": float(np.mean(q.cosines)),
                                "deviation_norm": float(np.mean(q.deviations))})
        sec = list(minibatch.layer_secant_curvature(model, x[:512], y[:512]))
        lam = hessian_eigenvalues(model, (x[:512], y[:512]), per_layer=True, tol=1e-2, max_iter=10,
                                  seed=cfg.seed, on_fail="ignore")
        tops = [r.top for r in lam.values()][: len(sec)]
        if len(tops) == len(sec):
            mine["secant"], mine["lam"] = sec, tops
            out["secant"] += sec
            out["lam"] += tops
    td = get_data(configs[0], resolve_device(configs[0].device))
    out["bn_signal_1"] = minibatch.batchnorm_signal(td.x_train[:2048], 1)
    out["bn_signal_64"] = minibatch.batchnorm_signal(td.x_train[:2048], 64)
    out["table"] = [{"batch_size": b, "cosine_to_full": float(np.mean(out["cos"][b])),
                     "deviation_norm": float(np.mean(out["dev"][b]))} for b in sorted(out["cos"])]
    return out


def step_claims(per_run: list[dict[str, Any]], q: dict[str, Any]) -> list[Claim]:
    """C1, P4, K6, C6, P6 with n = training seeds: each trend is one slope or Kendall tau per
    seed (over batch sizes, or over layers for C6), the interval over seeds; the 16 gradient
    draws per batch size are averaged inside the seed. P4, K6 and P6 follow from sampling
    theory or an identity, so they are checks (`construction`), never evidence."""
    seeds = sorted({r["seed"] for r in per_run})

    def trend(metric: str, sign: float = 1.0, log: bool = True) -> list[tuple[list, list]]:
        out = []
        for sd in seeds:
            mine = sorted((r for r in per_run if r["seed"] == sd and np.isfinite(r[metric])),
                          key=lambda r: r["batch_size"])
            xs = [float(np.log(r["batch_size"])) for r in mine]
            ys = [sign * r[metric] for r in mine]
            if log:
                keep = [i for i, v in enumerate(ys) if v > 0]
                xs, ys = [xs[i] for i in keep], [float(np.log(ys[i])) for i in keep]
            out.append((xs, ys))
        return out

    claims = [
        Claim("grad-norm-decreases", "C1", "the per-step gradient norm shrinks as the batch grows",
              I.slope(trend("step_grad_norm")), V.below(0.0),
              "slope of log mean per-step gradient norm on log batch size, one per seed",
              {"per_run": per_run}, primary=True),
        Claim("loss-update-grows", "C1", "the per-step loss update (decrease on the step's own "
              "batch) grows in size with the batch",
              I.correlation(trend("step_loss_update", -1.0, log=False)), V.above(0.0),
              "Kendall tau(batch size, -mean per-step loss update) per seed, interval over seeds",
              {"per_run": per_run}, primary=True),
    ]
    per_seed = q.get("per_seed", {})
    sds = sorted(per_seed)

    def curve(key: str, log_y: bool) -> list[tuple[list, list]]:
        out = []
        for sd in sds:
            d = per_seed[sd][key]
            bs = sorted(b for b in d if np.isfinite(d[b]) and (d[b] > 0 or not log_y))
            out.append(([float(np.log(b)) for b in bs],
                        [float(np.log(d[b])) if log_y else d[b] for b in bs]))
        return out

    claims.append(Claim(
        "direction-improves", "P4", "a larger batch gives a gradient direction closer to the "
        "full-data gradient", I.slope(curve("cos", False)), V.above(0.0),
        "slope of the mean cosine(minibatch gradient, full gradient) on log batch size, one per "
        "seed (16 draws averaged inside it)", {k: float(np.mean(v)) for k, v in q["cos"].items()},
        construction="sampling theory: the mean of more i.i.d. per-example gradients is closer "
                     "to their expectation, so the cosine rises with the batch at any weights"))
    claims.append(Claim(
        "error-sqrt-m", "K6", "the minibatch gradient's error shrinks only like 1/sqrt(m)",
        I.slope(curve("dev", True)), V.within(0.1, -0.5),
        "slope of log mean |g_B - G| on log B, one per seed (sampling theory: -0.5)",
        {k: float(np.mean(v)) for k, v in q["dev"].items()},
        reading="the standard-error half of K6; the O(m) cost half is in throughput",
        construction="sampling theory: the standard error of a mean of m i.i.d. per-example "
                     "gradients is sigma / sqrt(m) (less with sampling without replacement)"))
    layers = [(per_seed[sd]["secant"], per_seed[sd]["lam"]) for sd in sds
              if len(per_seed[sd]["secant"]) >= 2]
    claims.append(Claim(
        "lars-secant-tracks-curvature", "C6", "LARS's secant curvature ||g_l||/||w_l|| ranks "
        "layers like CBLR's Hessian curvature (LARS as an instance of CBLR)",
        I.correlation(layers), V.above(0.0),
        "Kendall tau(secant curvature, top eigenvalue of the layer's Hessian block) over one "
        "seed's layers, interval over seeds", {"secant": q["secant"], "lambda": q["lam"]}))
    claims.append(Claim(
        "batchnorm-batch-1", "P6", "batch normalization at batch size 1 keeps none of the input",
        I.replicate_mean([q["bn_signal_1"]], what="measurements"), V.below(0.01),
        "fraction of the input variance kept by training-mode batch normalization "
        "at batch size 1", {"batch_1": q["bn_signal_1"], "batch_64": q["bn_signal_64"]},
        construction="an identity: a batch of one example normalized by its own mean is "
                     "exactly zero before the affine map"))
    return claims


def _figure(rows: list[dict[str, Any]], sizes: list[int]) -> Any:
    curv = sorted({k for r in rows for k in r if k.startswith("curv_layer")})
    keys = [*METRICS, *curv]
    fig, axes = plt.subplots(1, len(keys), figsize=(3.3 * len(keys), 3))
    for ax, k in zip(np.atleast_1d(axes), keys):
        for b in sizes:
            sel = [r for r in rows if r["batch_size"] == b and r["seed"] == rows[0]["seed"]]
            ax.plot([r["epoch"] for r in sel], [r.get(k, np.nan) for r in sel], "o-",
                    label=f"B={b}", ms=3)
        ax.set_title(k, fontsize=9)
        ax.set_xlabel("epoch")
    np.atleast_1d(axes)[0].legend(fontsize=7)
    fig.tight_layout()
    return fig


EXPERIMENT = Experiment(
    name="step-lengths",
    title="Gradient, update and loss-update step lengths across batch sizes",
    units=units,
    analyze=analyze,
    description="Per-step structural measurements and per-layer curvature vs batch size.",
)
