"""Gradient competition (MNIST study, part 2): do samples in one batch "compete"?

For an early and a late checkpoint, each trial sums the last layer's weight gradients over one
pass through the same 1024 samples at every batch size b, in three documented modes
(`batchlab.analysis.gradcomp`: displacement, sample-sum, sum-loss), and the study's claims are judged
per mode from the measured norms. Also answers the study's open questions: the functional form
of std(norm) vs b, and how much of the variance is explained by which samples were drawn
(nested design: a few fixed sample sets x several orders each, law of total variance).

Options (`--set KEY=VALUE`): trials, batch_sizes, n_samples, early_epochs, late_epochs,
late_batch_size, lr, modes, keep_tensors, same_samples, decomp_sets, decomp_orders,
decomp_batch_sizes, k, threads, engine, blowup_loss, seed, checkpoint_early, checkpoint_late,
tensor_dir, hidden.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Any

import numpy as np
from rich.progress import (
    BarColumn,
    Progress,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from scipy import optimize, stats

from batchlab.analysis import gradcomp as gc
from batchlab.config import Phase
from batchlab.engine.train import build_model, get_data, resolve_device
from batchlab.errors import ConfigError
from batchlab.experiments import Claim, Context, Experiment, Output
from batchlab.experiments.outputs import md_table
from batchlab.experiments.verdicts_legacy import (
    INCONCLUSIVE,
    NOT_REPRODUCED,
    REPRODUCED,
    greater,
    monotone,
)
from batchlab.nn.checkpoint import load_state

NAME = "gradient-competition"
REGIMES = ("early", "late")

DEFAULTS: dict[str, dict[str, Any]] = {
    # quick: ~24k-sample MNIST or mnist-5k, CPU minutes; paper: the study's 1000 trials
    "quick": {"trials": 8, "late_epochs": 10, "decomp_sets": 3, "decomp_orders": 3,
              "decomp_batch_sizes": [1, 8, 64, 1024]},
    "paper": {"trials": 1000, "late_epochs": 30, "decomp_sets": 10, "decomp_orders": 10,
              "decomp_batch_sizes": list(gc.BATCH_SIZES)},
}
COMMON: dict[str, Any] = {
    "batch_sizes": list(gc.BATCH_SIZES), "n_samples": 1024, "early_epochs": 2,
    "late_batch_size": 1024, "lr": 0.01, "modes": list(gc.MODES), "keep_tensors": True,
    "same_samples": False, "k": None, "threads": None, "engine": None, "blowup_loss": 100.0,
    "seed": 0,
    "checkpoint_early": None, "checkpoint_late": None, "tensor_dir": None,
    "hidden": [1024, 1024],  # the study's MLP; smaller only for tests and demos
}


def options(ctx: Context) -> dict[str, Any]:
    """Preset defaults overridden by --set options (unknown keys are an error)."""
    opts = {**COMMON, **DEFAULTS["paper" if ctx.paper else "quick"]}
    unknown = sorted(set(ctx.options) - set(opts))
    if unknown:
        raise ConfigError(f"unknown option(s) for {NAME}: {', '.join(unknown)}; "
                          f"known: {', '.join(sorted(opts))}")
    opts.update(ctx.options)
    for key in ("batch_sizes", "modes", "decomp_batch_sizes"):
        if not isinstance(opts[key], list):
            opts[key] = [opts[key]]
    n = int(opts["n_samples"])
    opts["batch_sizes"] = gc.validate_batch_sizes(opts["batch_sizes"], n)
    opts["decomp_batch_sizes"] = gc.validate_batch_sizes(opts["decomp_batch_sizes"], n)
    if int(opts["trials"]) < 2:
        raise ConfigError("trials must be at least 2 (a standard deviation is reported)")
    if int(opts["decomp_sets"]) < 2 or int(opts["decomp_orders"]) < 2:
        raise ConfigError("decomp_sets and decomp_orders must be at least 2")
    bad = [m for m in opts["modes"] if m not in gc.MODES]
    if bad:
        raise ConfigError(f"unknown modes {bad}; choose from {', '.join(gc.MODES)}")
    for key in ("k", "threads"):  # unset = the device's default
        v = opts[key]
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
            raise ConfigError(f"{key} must be a positive integer, got {v!r}")
    if opts["engine"] is not None and opts["engine"] not in gc.ENGINES:
        raise ConfigError(f"unknown engine {opts['engine']!r}; choose from {', '.join(gc.ENGINES)}")
    if not 1 <= int(opts["early_epochs"]) < int(opts["late_epochs"]):
        raise ConfigError("need 1 <= early_epochs < late_epochs")
    return opts


# -- checkpoints -------------------------------------------------------------------------
def checkpoints(ctx: Context, o: dict[str, Any]):
    """(config, data, {regime: (state, id)}): both checkpoints from ONE training run through
    the store (resumable), unless the user passes checkpoint files."""
    e, late = int(o["early_epochs"]), int(o["late_epochs"])
    fields: dict[str, Any] = dict(lr=o["lr"], init="glorot", batch_size=1024, epochs=late,
                                  hidden=list(o["hidden"]),
                                  seed=int(o["seed"]), checkpoint_epochs=[e, late])
    if int(o["late_batch_size"]) != 1024:
        fields["schedule"] = [Phase(epochs=e, batch_size=1024),
                              Phase(epochs=late - e, batch_size=int(o["late_batch_size"]))]
    cfg = ctx.config(**fields)
    data = get_data(cfg, resolve_device(cfg.device))
    if int(o["n_samples"]) > data.n_train:
        raise ConfigError(f"n_samples {o['n_samples']} exceeds the training set ({data.n_train})")
    user = {"early": o["checkpoint_early"], "late": o["checkpoint_late"]}
    states: dict[str, tuple[dict, str]] = {}
    if not all(user.values()):
        res = ctx.run_many([cfg], label=NAME)[0]
        if res.status != "completed":
            raise ConfigError(f"checkpoint training run {res.run_id} {res.status}")
        states = {"early": (res.checkpoint(e), f"{res.key}:{e}"),
                  "late": (res.checkpoint(late), f"{res.key}:{late}")}
    for regime, path in user.items():
        if path:
            from batchlab.data.idx import sha256_file

            p = Path(path)
            if not p.is_file():
                raise ConfigError(f"checkpoint file {p} does not exist")
            states[regime] = (load_state(p), sha256_file(p))
    return cfg, data, states


# -- statistics --------------------------------------------------------------------------
def power_fit(bs: list[int], per_b: list[np.ndarray], n_boot: int = 300,
              seed: int = 0) -> dict[str, float]:
    """log(mean norm) = a + p log b by least squares. CI of p two ways: regression standard
    error (t, n-2 dof; covers misfit of the power law) and a bootstrap over trials (covers
    trial noise). The reported `ci_low/ci_high` is the union of both (conservative)."""
    ok = [(b, v) for b, v in zip(bs, per_b) if len(v) >= 2 and np.mean(v) > 0]
    if len(ok) < 3:
        return {"exponent": math.nan, "ci_low": math.nan, "ci_high": math.nan, "r2": math.nan,
                "se": math.nan, "boot_low": math.nan, "boot_high": math.nan, "n_b": len(ok)}
    lb = np.log([b for b, _ in ok])
    lm = np.log([np.mean(v) for _, v in ok])
    fit = stats.linregress(lb, lm)
    t = stats.t.ppf(0.975, len(ok) - 2)
    rng = np.random.default_rng(seed)
    boots = []
    for _ in range(n_boot):
        means = [np.mean(rng.choice(v, size=len(v))) for _, v in ok]
        boots.append(stats.linregress(lb, np.log(means)).slope)
    lo, hi = np.percentile(boots, [2.5, 97.5])
    r_lo, r_hi = fit.slope - t * fit.stderr, fit.slope + t * fit.stderr
    return {"exponent": float(fit.slope), "se": float(fit.stderr), "r2": float(fit.rvalue**2),
            "reg_low": float(r_lo), "reg_high": float(r_hi), "boot_low": float(lo),
            "boot_high": float(hi), "ci_low": float(min(lo, r_lo)),
            "ci_high": float(max(hi, r_hi)), "prefactor": float(math.exp(fit.intercept)),
            "n_b": len(ok)}


def std_form(bs: list[int], stds: list[float]) -> dict[str, Any]:
    """Open question 1: the functional form of std(norm) vs b. Candidates, fitted in log
    space: power law c b^q, and sqrt(alpha + beta b) (what norm^2 linear in b would give).
    Reports both and the one with the smaller RMS log-residual."""
    pts = [(b, s) for b, s in zip(bs, stds) if math.isfinite(s) and s > 0]
    if len(pts) < 3:
        return {"best": "n/a"}
    b = np.array([p[0] for p in pts], float)
    ls = np.log([p[1] for p in pts])
    pw = stats.linregress(np.log(b), ls)
    rms_pw = float(np.sqrt(np.mean((pw.intercept + pw.slope * np.log(b) - ls) ** 2)))

    def sq(bb, la, lbeta):
        return 0.5 * np.log(np.exp(la) + np.exp(lbeta) * bb)

    try:
        s0 = np.exp(ls)
        p0 = [math.log(max(s0[0] ** 2, 1e-30)), math.log(max(s0[-1] ** 2 / b[-1], 1e-30))]
        with warnings.catch_warnings():  # a degenerate covariance is fine: we use the fit only
            warnings.simplefilter("ignore", optimize.OptimizeWarning)
            (la, lbeta), _ = optimize.curve_fit(sq, b, ls, p0=p0, maxfev=5000)
        rms_sq = float(np.sqrt(np.mean((sq(b, la, lbeta) - ls) ** 2)))
    except (RuntimeError, ValueError):
        la = lbeta = rms_sq = math.nan
    best = "power" if not (rms_sq < rms_pw) else "sqrt(alpha+beta*b)"
    return {"power_q": float(pw.slope), "power_q_se": float(pw.stderr), "power_c":
            float(math.exp(pw.intercept)), "power_rms_log": rms_pw,
            "alpha": float(math.exp(la)) if math.isfinite(la) else math.nan,
            "beta": float(math.exp(lbeta)) if math.isfinite(lbeta) else math.nan,
            "sqrt_rms_log": rms_sq, "best": best}


def decompose(norms: np.ndarray, sets: int, orders: int) -> dict[str, float]:
    """Open question 2: variance of the norm split into 'which samples' vs 'the rest'.

    `norms` is [sets, orders]: each row one fixed sample set, shuffled by different seeds.
    Law of total variance: Var = Var_set(E[norm | set]) + E_set[Var(norm | set)]. The
    between-set component is estimated without bias by one-way random-effects ANOVA,
    sigma2_set = max(0, (MS_between - MS_within) / orders). With plain SGD and a fixed set the
    only remaining randomness is the ORDER of the samples (which samples share a batch and
    the sequence of steps); at b = n there is one full-batch step and the order only changes
    float summation, so the within-set part is ~0 there by construction."""
    g = np.asarray(norms, float).reshape(sets, orders)
    msw = float(np.mean(np.var(g, axis=1, ddof=1)))
    msb = float(orders * np.var(g.mean(axis=1), ddof=1))
    s2_set = max(0.0, (msb - msw) / orders)
    total = s2_set + msw
    return {"var_samples": s2_set, "var_order": msw, "var_total": total,
            "share_samples": s2_set / total if total > 0 else math.nan}


def tables(recs: dict[str, dict[int, dict]], o: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per (regime, mode, b): norm statistics over finite trials, blow-ups, values."""
    rows = []
    for regime, by_b in recs.items():
        for mode in o["modes"]:
            ref = gc.norms_array(by_b[max(by_b)], mode)
            mu_ref = float(np.mean(ref)) if len(ref) else math.nan
            for b, rec in sorted(by_b.items()):
                v = gc.norms_array(rec, mode)
                mean = float(np.mean(v)) if len(v) else math.nan
                std = float(np.std(v, ddof=1)) if len(v) > 1 else math.nan
                vs = gc.ValueStats.from_json(rec["modes"][mode]["values"]).summary()
                rows.append({
                    "kind": "norm", "regime": regime, "mode": mode, "b": b,
                    "trials": rec["trials"], "blowups": int(sum(rec["modes"][mode]["blowup"])),
                    "mean": mean, "std": std, "cv": std / mean if mean > 0 else math.nan,
                    "norm_mean": mu_ref, "norm_std": std * mu_ref / mean if mean > 0 else math.nan,
                    **vs, "seconds": rec["seconds"], "k": rec["k"],
                    "engine": rec.get("engine", "fused"),
                })
    return rows


# -- claims ------------------------------------------------------------------------------
def _combine(verdicts: list[str]) -> str:
    """A claim made for both regimes: reproduced if reproduced in each, not reproduced if
    not reproduced in any, else inconclusive."""
    if verdicts and all(v == REPRODUCED for v in verdicts):
        return REPRODUCED
    return NOT_REPRODUCED if NOT_REPRODUCED in verdicts else INCONCLUSIVE


def _sqrt_verdict(fit: dict[str, float]) -> str:
    lo, hi = fit["ci_low"], fit["ci_high"]
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return INCONCLUSIVE
    if hi < 0.4 or lo > 0.6:
        return NOT_REPRODUCED
    return REPRODUCED if lo >= 0.25 and hi <= 0.75 else INCONCLUSIVE


def claims_for(mode: str, rows: list[dict], fits: dict, recs: dict) -> list[Claim]:
    out = []
    sel = {r: [x for x in rows if x["mode"] == mode and x["regime"] == r and x["kind"] == "norm"]
           for r in REGIMES}

    def trend(col: str, min_effect: float, log: bool, what: str):
        vs, evs, rule = [], {}, ""
        for r in REGIMES:
            xs = [x["b"] for x in sel[r] if math.isfinite(x[col]) and (x[col] > 0 or not log)]
            ys = [math.log(x[col]) if log else x[col] for x in sel[r]
                  if math.isfinite(x[col]) and (x[col] > 0 or not log)]
            if len(xs) < 3:
                vs.append(INCONCLUSIVE)
                continue
            v, ev, rule = monotone(xs, ys, True, min_effect, what)
            vs.append(v)
            evs[f"{r}_rho"], evs[f"{r}_change"] = ev["spearman_rho"], ev["change_first_to_last"]
            evs[f"{r}_verdict"] = v
        return _combine(vs), evs, rule + "; both regimes must agree"

    v, ev, rule = trend("mean", math.log(1.1), True, "log mean summed-gradient norm vs b")
    out.append(Claim(f"{mode}:larger-batch-larger-step",
                     f"[{mode}] larger batches take larger total gradient steps for the same "
                     f"samples", v, ev, rule))
    ev = {f"{r}_{k}": fits[(r, mode)][k] for r in REGIMES
          for k in ("exponent", "ci_low", "ci_high")}
    vs = [_sqrt_verdict(fits[(r, mode)]) for r in REGIMES]
    out.append(Claim(f"{mode}:norm-grows-like-sqrt-b", f"[{mode}] the norm grows like sqrt(b)",
                     _combine(vs), ev,
                     "power-law exponent of mean norm vs b (95% CI = union of regression-SE and "
                     "trial-bootstrap CIs): reproduced if the CI lies within [0.25, 0.75] and "
                     "meets [0.4, 0.6]; not reproduced if it lies entirely outside [0.4, 0.6]; "
                     "both regimes must agree"))
    v, ev, rule = trend("cv", math.log(1.1), True,
                        "log relative spread std/mean (= std normalized to equal mean distance)")
    out.append(Claim(f"{mode}:same-distance-larger-batch-varies-more",
                     f"[{mode}] for the same mean distance, larger batches vary more", v, ev,
                     rule))
    v, ev, rule = trend("kurtosis", 0.5, False, "excess kurtosis of pooled gradient values")
    out.append(Claim(f"{mode}:larger-batch-heavier-tails",
                     f"[{mode}] larger batches have heavier-tailed gradient distributions",
                     v, ev, rule))
    per_b = []
    for b in sorted(recs["early"]):
        if b not in recs["late"]:
            continue
        vb, _, _ = greater(gc.norms_array(recs["early"][b], mode),
                           gc.norms_array(recs["late"][b], mode), 0.0, "early > late")
        per_b.append(vb)
    n_rep, n_not = per_b.count(REPRODUCED), per_b.count(NOT_REPRODUCED)
    v = (REPRODUCED if n_rep == len(per_b) and per_b else
         NOT_REPRODUCED if 2 * n_not >= len(per_b) else INCONCLUSIVE)
    out.append(Claim(f"{mode}:early-larger-than-late",
                     f"[{mode}] early gradients are larger than late ones", v,
                     {"b_reproduced": n_rep, "b_not_reproduced": n_not, "b_total": len(per_b)},
                     "per b: mean early norm > mean late norm by more than 2 x SE over trials; "
                     "reproduced if so at every b, not reproduced if the opposite holds at "
                     "half of the b or more, else inconclusive"))
    return out


# -- figures -----------------------------------------------------------------------------
def figures(rows: list[dict], fits: dict, recs: dict, o: dict) -> dict[str, Any]:
    import matplotlib.pyplot as plt

    modes = o["modes"]
    figs: dict[str, Any] = {}
    colors = {"early": "tab:blue", "late": "tab:red"}

    def sel(r, m):
        return [x for x in rows if x["regime"] == r and x["mode"] == m and x["kind"] == "norm"]

    fig, axes = plt.subplots(1, len(modes), figsize=(5 * len(modes), 4), squeeze=False)
    for ax, m in zip(axes[0], modes):
        for r in REGIMES:
            xs = sel(r, m)
            b = np.array([x["b"] for x in xs])
            mu = np.array([x["mean"] for x in xs])
            sd = np.array([x["std"] for x in xs])
            f = fits[(r, m)]
            ax.errorbar(b, mu, yerr=sd, fmt="o", ms=3, capsize=2, color=colors[r],
                        label=f"{r}: p={f['exponent']:.2f} [{f['ci_low']:.2f}, {f['ci_high']:.2f}]")
            if math.isfinite(f["exponent"]):
                ax.plot(b, f["prefactor"] * b ** f["exponent"], "--", color=colors[r], lw=1)
        ax.set(xscale="log", yscale="log", xlabel="batch size b", ylabel="summed-gradient norm",
               title=f"{m}: mean ± std, fit c·b^p")
        ax.legend(fontsize=7)
    figs["norm_vs_b.png"] = fig

    fig, axes = plt.subplots(1, len(modes), figsize=(5 * len(modes), 4), squeeze=False)
    for ax, m in zip(axes[0], modes):
        for r in REGIMES:
            xs = sel(r, m)
            b = [x["b"] for x in xs]
            ax.plot(b, [x["norm_mean"] for x in xs], "-", color=colors[r], label=f"{r} mean")
            ax.plot(b, [x["norm_std"] for x in xs], "o--", ms=3, color=colors[r],
                    label=f"{r} std")
        ax.set(xscale="log", yscale="log", xlabel="batch size b",
               ylabel="norm × mu_max / mu_b", title=f"{m}: normalized to equal mean distance")
        ax.legend(fontsize=7)
    figs["normalized_vs_b.png"] = fig

    for r in REGIMES:
        bs = sorted(recs[r])
        ncol = 5
        nrow = math.ceil(len(bs) / ncol)
        fig, axes = plt.subplots(nrow, ncol, figsize=(3 * ncol, 2.3 * nrow), squeeze=False)
        for ax, b in zip(axes.flat, bs):
            for m in modes:
                # norm x mu_max / mu_b in units of mu_max = norm / mu_b: one axis for all modes
                v = gc.norms_array(recs[r][b], m)
                if len(v) and np.mean(v) > 0:
                    ax.hist(v / np.mean(v), bins=20, histtype="step", label=m)
            ax.set_title(f"b={b}", fontsize=8)
            ax.tick_params(labelsize=6)
        for ax in list(axes.flat)[len(bs):]:
            ax.axis("off")
        axes.flat[0].legend(fontsize=6)
        fig.suptitle(f"{r}: normalized norms over trials (norm × mu_max / mu_b, in units of "
                     "mu_max)")
        fig.tight_layout()
        figs[f"norm_hist_{r}.png"] = fig

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    edges = np.linspace(-gc.HIST_RANGE, gc.HIST_RANGE, gc.HIST_BINS + 1)
    centers = (edges[1:] + edges[:-1]) / 2
    cmap = plt.get_cmap("viridis")
    m0 = "displacement" if "displacement" in modes else modes[0]
    for ax, r in zip(axes[:2], REGIMES):
        bs = sorted(recs[r])
        for i, b in enumerate(bs):
            h = np.array(recs[r][b]["modes"][m0]["values"]["hist"], float)
            ax.plot(centers, np.where(h > 0, h, np.nan), color=cmap(i / max(1, len(bs) - 1)),
                    lw=0.8, label=f"b={b}" if i % 3 == 0 or b == bs[-1] else None)
        ax.set(yscale="log", xlabel="value / RMS (first chunk)", ylabel="count",
               title=f"{r} [{m0}]: pooled raw gradient values")
        ax.legend(fontsize=6)
    for m in modes:
        for r in REGIMES:
            xs = sel(r, m)
            axes[2].plot([x["b"] for x in xs], [x["tail_fraction"] for x in xs], "o-", ms=3,
                         color=colors[r], alpha=0.4 + 0.3 * modes.index(m) / max(1, len(modes)),
                         label=f"{r} {m}")
    axes[2].set(xscale="log", yscale="log", xlabel="batch size b",
                ylabel=f"fraction |value| > {gc.TAIL_K:g} RMS", title="tail vs b")
    axes[2].legend(fontsize=6)
    fig.tight_layout()
    figs["value_hist.png"] = fig
    return figs


def _trials(ctx: Context, run: gc.TrialRun, model, data, tdir: Path, ckpt_id: str,
            keep: bool) -> dict[int, dict]:
    """`gc.run_trials` under a progress bar weighted by SGD steps (a b=1 trial is 1024 steps,
    a b=1024 trial one), so the time remaining is meaningful."""
    n = run.n_samples
    steps = {b: math.ceil(n / b) for b in run.batch_sizes}
    cols = (TextColumn("[bold]{task.description}"), BarColumn(), TaskProgressColumn(),
            TimeElapsedColumn(), TimeRemainingColumn())
    with Progress(*cols, console=ctx.console, transient=True) as bar:
        task = bar.add_task(f"{run.name} trials", total=len(run.seeds) * sum(steps.values()))
        return gc.run_trials(run, model, data.x_train, data.y_train, tdir, ckpt_id,
                             keep_tensors=keep, progress=bar.console.print,
                             advance=lambda b, t: bar.advance(task, t * steps[b]))


# -- the experiment ----------------------------------------------------------------------
def run(ctx: Context) -> Output:
    o = options(ctx)
    cfg, data, states = checkpoints(ctx, o)
    model = build_model(cfg, data)
    tdir = Path(o["tensor_dir"]) if o["tensor_dir"] else ctx.out(NAME) / "tensors"
    seed, T = int(o["seed"]), int(o["trials"])
    keep = bool(o["keep_tensors"])
    common = dict(n_samples=int(o["n_samples"]), lr=float(o["lr"]),
                  blowup_loss=float(o["blowup_loss"]), k=o["k"], threads=o["threads"],
                  engine=o["engine"])
    recs: dict[str, dict[int, dict]] = {}
    decomp: dict[str, dict[int, dict]] = {}
    trial_rows = []
    S, R = int(o["decomp_sets"]), int(o["decomp_orders"])
    for regime in REGIMES:
        state, ckpt_id = states[regime]
        gc.fit_state(model, state, f"{regime} checkpoint")
        seeds = gc.trial_seeds(seed, regime, T)
        fixed = gc.trial_seeds(seed, f"{regime}/samples", 1)[0] if o["same_samples"] else None
        main = gc.TrialRun(regime, seeds, [fixed] * T, o["batch_sizes"], o["modes"], **common)
        recs[regime] = _trials(ctx, main, model, data, tdir, ckpt_id, keep)
        set_seeds = gc.trial_seeds(seed, f"{regime}/sets", S)
        dmodes = [m for m in ("displacement", "sample-sum") if m in o["modes"]] or ["displacement"]
        dec = gc.TrialRun(f"{regime}-decomp", gc.trial_seeds(seed, f"{regime}/orders", S * R),
                          [s for s in set_seeds for _ in range(R)], o["decomp_batch_sizes"],
                          dmodes, **common)
        decomp[regime] = _trials(ctx, dec, model, data, tdir, ckpt_id, keep)
        for b, rec in recs[regime].items():
            for m in o["modes"]:
                mm = rec["modes"][m]
                trial_rows += [{"regime": regime, "mode": m, "b": b, "trial": t, "seed": s,
                                "sample_seed": fixed, "norm": mm["norms"][t],
                                "max_step_loss": mm["max_loss"][t], "blowup": mm["blowup"][t]}
                               for t, s in enumerate(seeds)]

    rows = tables(recs, o)
    fits, forms = {}, {}
    for r in REGIMES:
        for m in o["modes"]:
            bs = sorted(recs[r])
            fits[(r, m)] = power_fit(bs, [gc.norms_array(recs[r][b], m) for b in bs], seed=seed)
            sds = [x["std"] for x in rows if x["regime"] == r and x["mode"] == m]
            forms[(r, m)] = std_form(bs, sds)
            rows.append({"kind": "fit", "regime": r, "mode": m, **fits[(r, m)],
                         **{f"std_{k}": v for k, v in forms[(r, m)].items()}})
    dec_rows = []
    for r in REGIMES:
        for b, rec in sorted(decomp[r].items()):
            for m in rec["modes"]:
                v = np.array([np.nan if x is None else x for x in rec["modes"][m]["norms"]])
                dec_rows.append({"kind": "decomposition", "regime": r, "mode": m, "b": b,
                                 "sets": S, "orders": R, **decompose(v, S, R)})
    rows += dec_rows
    claims = [c for m in o["modes"] for c in claims_for(m, rows, fits, recs)]
    summary = _summary(rows, fits, forms, dec_rows, o, cfg, T)
    from batchlab.experiments.outputs import rows_to_csv

    return Output(rows=rows, summary=summary, claims=claims,
                  figures=figures(rows, fits, recs, o),
                  extra_files={"trials.csv": rows_to_csv(trial_rows)})


def _summary(rows, fits, forms, dec_rows, o, cfg, T) -> str:
    fit_rows = [{"regime": r, "mode": m, "exponent": f["exponent"], "95% CI":
                 f"[{f['ci_low']:.3f}, {f['ci_high']:.3f}]", "reg. SE": f["se"],
                 "bootstrap CI": f"[{f['boot_low']:.3f}, {f['boot_high']:.3f}]", "R²": f["r2"]}
                for (r, m), f in fits.items()]
    form_rows = [{"regime": r, "mode": m, "std ~ b^q: q": f.get("power_q", math.nan),
                  "rms log resid (power)": f.get("power_rms_log", math.nan),
                  "sqrt(a+b·B): a": f.get("alpha", math.nan), "beta": f.get("beta", math.nan),
                  "rms log resid (sqrt)": f.get("sqrt_rms_log", math.nan), "better": f["best"]}
                 for (r, m), f in forms.items()]
    norm_rows = [x for x in rows if x["kind"] == "norm"]
    blow = [x for x in norm_rows if x["blowups"]]
    lines = [
        f"Checkpoints: default MLP, Glorot, SGD lr {o['lr']}, batch 1024 on {cfg.dataset}; "
        f"early = epoch {o['early_epochs']}, late = epoch {o['late_epochs']}"
        f" (late batch size {o['late_batch_size']}). {T} trials per batch size and regime, "
        f"{o['n_samples']} samples each (fresh samples per trial"
        f"{'; SAME sample set in every trial' if o['same_samples'] else ''}). "
        "Remainder rule: floor(n/b) steps of b, then one step with the n mod b left over. "
        f"Engine: {', '.join(sorted({str(x['engine']) for x in norm_rows}))} "
        "(`batchlab.analysis.gradcomp`; every trial replays from its seed in trials.csv).",
        "",
        "Modes: `displacement` = sum of mean-loss step gradients (= weight displacement / lr); "
        "`sample-sum` = the same steps, each gradient x its batch size (sum of per-sample "
        "gradients); `sum-loss` = sum-reduced loss for stepping (lr x B) and recording. "
        f"A sum-loss trial 'blows up' if a step loss is non-finite or > {o['blowup_loss']:g} "
        "nats or the summed gradient is non-finite; such trials are kept in the tensor files "
        "and trials.csv but excluded from the statistics.",
        "",
        "## Power-law fit of mean norm vs b (exponent p in norm ~ b^p; the study: p = 0.5)",
        "", md_table(fit_rows),
        "## Norm statistics", "",
        md_table(norm_rows, ["regime", "mode", "b", "trials", "blowups", "mean", "std", "cv",
                             "norm_std", "kurtosis", "tail_fraction", "seconds"]),
        "## Sum-loss blow-ups", "",
        (md_table(blow, ["regime", "mode", "b", "trials", "blowups"]) if blow
         else "No trial blew up.\n"),
        "## Open question 1: functional form of std(norm) vs b", "",
        md_table(form_rows),
        "## Open question 2: variance from which samples were drawn vs the rest", "",
        f"Nested design: {o['decomp_sets']} fixed sample sets x {o['decomp_orders']} orders "
        "each (same-samples option). With a fixed set and plain SGD the only remaining "
        "randomness is the order of the samples (which samples share a batch, the sequence of "
        "steps): at b = n it reduces to float summation order. `share_samples` = between-set "
        "variance (one-way random-effects ANOVA) / total.", "",
        md_table(dec_rows, ["regime", "mode", "b", "var_samples", "var_order", "share_samples"]),
    ]
    return "\n".join(lines)


EXPERIMENT = Experiment(NAME, "Gradient competition: summed gradients vs batch size", run,
                        description=__doc__ or "", mlp_only="its trials run on the fused/deferred MLP engines")
