"""Gradient competition (MNIST study, part 2): do samples in one batch "compete"?

For an early and a late checkpoint, each trial sums the last layer's weight gradients over one
pass through the same 1024 samples at every batch size b, in three documented modes
(`batchlab.analysis.gradcomp`: displacement, sample-sum, sum-loss), and the study's claims are judged
per mode from the measured norms. Also answers the study's open questions: the functional form
of std(norm) vs b, and how much of the variance is explained by which samples were drawn
(nested design: a few fixed sample sets x several orders each, law of total variance).

Options (`--set KEY=VALUE`): trials, batch_sizes, n_samples, early_epochs, late_epochs,
late_batch_size, lr, modes, keep_tensors, same_samples, decomp_sets, decomp_orders,
decomp_batch_sizes, k, threads, chunk, engine, blowup_loss, seed, checkpoint_early, checkpoint_late,
tensor_dir, hidden.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from batchlab.analysis import gradcomp as gc
from batchlab.analysis.gradcomp_runner import run_trials
from batchlab.analysis.gradcomp_stats import norms_array
from batchlab.analysis.gradcomp_trials import TrialRun
from batchlab.config import Phase
from batchlab.engine.setup import build_model, get_data, resolve_device
from batchlab.errors import ConfigError
from batchlab.experiments import Context, Experiment, Output
from batchlab.experiments.gradient_competition_claims import REGIMES, claims_for, study_numbers
from batchlab.experiments.gradient_competition_figures import figures
from batchlab.experiments.gradient_competition_stats import (
    decompose,
    power_fit,
    std_form,
    tables,
)
from batchlab.experiments.gradient_competition_summary import summary_md
from batchlab.nn.checkpoint import load_state

NAME = "gradient-competition"

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
    "chunk": None,
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
    for key in ("k", "threads", "chunk"):  # unset = the device's default
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


# -- the experiment ----------------------------------------------------------------------
def trial_runs(o: dict[str, Any], regime: str) -> tuple[TrialRun, TrialRun]:
    """The main and the decomposition trial designs of one regime (seeds recorded)."""
    seed, T = int(o["seed"]), int(o["trials"])
    common = dict(n_samples=int(o["n_samples"]), lr=float(o["lr"]),
                  blowup_loss=float(o["blowup_loss"]), k=o["k"], threads=o["threads"],
                  engine=o["engine"], chunk=o["chunk"])
    fixed = gc.trial_seeds(seed, f"{regime}/samples", 1)[0] if o["same_samples"] else None
    main = TrialRun(regime, gc.trial_seeds(seed, regime, T), [fixed] * T, o["batch_sizes"],
                    o["modes"], **common)
    S, R = int(o["decomp_sets"]), int(o["decomp_orders"])
    set_seeds = gc.trial_seeds(seed, f"{regime}/sets", S)
    dmodes = [m for m in ("displacement", "sample-sum") if m in o["modes"]] or ["displacement"]
    dec = TrialRun(f"{regime}-decomp", gc.trial_seeds(seed, f"{regime}/orders", S * R),
                   [s for s in set_seeds for _ in range(R)], o["decomp_batch_sizes"], dmodes,
                   **common)
    return main, dec


def _trials(ctx: Context, run: TrialRun, model, data, o: dict[str, Any]) -> dict[int, dict]:
    """`run_trials` through the store and the context's executor; progress is reported in
    SGD steps (a b=1 trial is 1024 steps, a b=1024 trial one), so time remaining means
    something; the CLI draws it (`ctx.progress`)."""
    tdir = Path(o["tensor_dir"]) if o["tensor_dir"] else ctx.out(NAME) / "tensors"
    steps = {b: run.steps(b) for b in run.batch_sizes}
    total = len(run.seeds) * sum(steps.values())
    done = [0]
    label = f"{run.name} trials"
    bar = ctx.progress

    def advance(b: int, trials: int) -> None:
        done[0] += trials * steps[b]
        if bar is not None:
            bar(label, done[0], total)

    def line(text: str) -> None:
        ctx.log(text)

    return run_trials(run, model, data.x_train, data.y_train, ctx.store,
                      tensor_dir=tdir, keep_tensors=bool(o["keep_tensors"]),
                      executor=ctx.executor, ray_address=ctx.ray_address, progress=line,
                      advance=advance)


# -- the experiment ----------------------------------------------------------------------
def run(ctx: Context) -> Output:
    o = options(ctx)
    if ctx.store is None:
        raise ConfigError("gradient-competition needs a results store")
    cfg, data, states = checkpoints(ctx, o)
    model = build_model(cfg, data)
    seed, T = int(o["seed"]), int(o["trials"])
    recs: dict[str, dict[int, dict]] = {}
    decomp: dict[str, dict[int, dict]] = {}
    trial_rows = []
    S, R = int(o["decomp_sets"]), int(o["decomp_orders"])
    for regime in REGIMES:
        state, _ = states[regime]
        gc.fit_state(model, state, f"{regime} checkpoint")
        main, dec = trial_runs(o, regime)
        recs[regime] = _trials(ctx, main, model, data, o)
        decomp[regime] = _trials(ctx, dec, model, data, o)
        for b, rec in recs[regime].items():
            for m in o["modes"]:
                mm = rec["modes"][m]
                trial_rows += [{"regime": regime, "mode": m, "b": b, "trial": t, "seed": s,
                                "sample_seed": ss, "norm": mm["norms"][t],
                                "max_step_loss": mm["max_loss"][t], "blowup": mm["blowup"][t]}
                               for t, (s, ss) in enumerate(zip(main.seeds, main.sample_seeds))]

    rows = tables(recs, o)
    fits, forms = {}, {}
    for r in REGIMES:
        for m in o["modes"]:
            bs = sorted(recs[r])
            fits[(r, m)] = power_fit(bs, [norms_array(recs[r][b], m) for b in bs], seed=seed)
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
    summary = summary_md(rows, fits, forms, dec_rows, o, cfg, T)
    from batchlab.experiments.outputs import rows_to_csv

    note = (f"preset {ctx.preset}, {T} trials per b, checkpoints after epochs "
            f"{o['early_epochs']} and {o['late_epochs']}")
    return Output(rows=rows, summary=summary, claims=claims,
                  figures=figures(rows, fits, recs, o),
                  extra_files={"trials.csv": rows_to_csv(trial_rows)},
                  study_numbers=study_numbers(rows, fits, recs, note))


EXPERIMENT = Experiment(NAME, "Gradient competition: summed gradients vs batch size", run,
                        description=__doc__ or "", mlp_only="its trials run on the fused/deferred MLP engines")
