"""Large-batch schedule recipes from the literature vs the small-batch baseline.

One small-batch config (batch B0, lr with step decays) is the baseline; a large batch B run
with the same settings shows the generalization gap. The recipes of `batchlab.engine.recipes` try to
close it: Goyal et al. (linear lr scaling + warmup) and Smith et al. (batch increases instead of
lr decays) at equal epochs, Hoffer et al. (epochs x B/B0, i.e. equal steps, sqrt lr scaling) on
the plain MLP and, with Ghost Batch Norm, on the MLP with BatchNorm against a BatchNorm
baseline. Each claim's verdict compares final test accuracy with the right baseline.

Smith's arm trains exactly as the baseline until the first lr decay, where its batch grows
instead: those epochs are one shared run per seed that both continue (`runs.continuation`).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from batchlab.config import plateau_start
from batchlab.engine.continuation import prefix_reason
from batchlab.engine.recipes import apply_recipe
from batchlab.experiments import intervals as I
from batchlab.experiments import verdicts as V
from batchlab.experiments.accuracies import accuracy_difference, bits_to_array
from batchlab.experiments.base import QUICK_HIDDEN, Context, Experiment, Output
from batchlab.experiments.claims import Claim, Gate
from batchlab.experiments.options import Schedules as SchedulesOptions
from batchlab.experiments.outputs import md_table
from batchlab.experiments.work import Results, Work

PLATEAU_TOL = 0.005
"""A run has converged (its train accuracy has plateaued) when its train accuracy moved by at
most this much over the last fifth of its epochs: "matches the small-batch accuracy" compares
where the arms end up, so it is decided only when both have stopped moving."""

LEARNED_MIN = 0.05
"""A plateau means convergence only for a run that has trained: its train accuracy must have
risen by at least this since its first evaluation (the initial weights). A run stuck at chance,
or with an lr too small to move, is flat too - without this gate it would pass as converged."""

COMPARABLE_TOL = 0.01
"""Train accuracies within this of each other count as comparable (K1's premise)."""

# arm -> (what it is compared with, fairness basis)
ARMS = {
    "small": ("", "baseline"),
    "large": ("small", "equal epochs"),
    "goyal": ("small", "equal epochs"),
    "smith": ("small", "equal epochs"),
    "hoffer": ("small", "equal steps"),
    "small-bn": ("", "baseline (BatchNorm)"),
    "hoffer-gbn": ("small-bn", "equal steps"),
}
CLAIMS = {
    "goyal": "linear lr scaling + gradual warmup (Goyal et al.) closes the large-batch gap",
    "smith": "increasing the batch size instead of decaying the lr (Smith et al.) matches the "
             "small-batch accuracy with fewer steps",
    "hoffer": "regime adaptation with sqrt lr scaling (Hoffer et al.) closes the gap",
    "hoffer-gbn": "regime adaptation + Ghost Batch Norm (Hoffer et al.) closes the gap of the "
                  "BatchNorm MLP",
}


def arm_fields(s: SchedulesOptions, n_train: int, model: str = "mlp") -> dict[str, dict[str, Any]]:
    """TrainConfig fields (without data, seed and the generic options `Context.config` adds)
    of every arm; `model`: what the configs train (BatchNorm arms only for the built-in MLP)."""
    base = {"batch_size": s.base_batch, "lr": s.lr, "epochs": s.epochs, "decay": "step",
            "decay_epochs": list(s.decay_epochs), "decay_factor": s.decay_factor}
    big = min(s.large_batch, n_train)
    # the equal-steps arms run big/base times the epochs: evaluated every big/base epochs they
    # are scored at the baseline's points in steps (and over the same last fifth), at a
    # (big/base)-th of the evaluation cost (`TrainConfig.eval_every`)
    ratio = max(1, round(big / s.base_batch))
    arms = {
        "small": base,
        "large": {**base, "batch_size": big},
        "goyal": apply_recipe("goyal", base, batch_size=big, warmup_epochs=s.warmup_epochs),
        "smith": apply_recipe("smith", base, max_batch=n_train),
        "hoffer": {**apply_recipe("hoffer", base, batch_size=big), "eval_every": ratio},
    }
    if s.gbn and model == "mlp":  # BatchNorm arms: the built-in MLP's
        bn = {**base, "batchnorm": True}
        arms["small-bn"] = bn
        arms["hoffer-gbn"] = {**apply_recipe("hoffer", bn, batch_size=big), "eval_every": ratio}
    return arms


def units(ctx: Context) -> Work:
    """Every arm (baseline, large batch, each recipe's schedule) with every seed."""
    from batchlab.engine.setup import get_data, resolve_device

    s = ctx.opts  # options.Schedules, resolved for the preset
    probe = ctx.config()
    n_train = get_data(probe, resolve_device(probe.device)).n_train
    arms = arm_fields(s, n_train, ctx.model or "mlp")
    names: list[str | None] = []
    cfgs = []
    for name, fields in arms.items():
        for seed in ctx.seed_list:
            names.append(name)
            cfgs.append(ctx.config(**fields, seed=seed, probes=[]))
    # the arms that follow the baseline's batch size and lr up to its first lr decay (Smith's
    # batch increases start there) share those epochs: one run of them per seed (name None),
    # which each such arm continues (`runs.continuation`) instead of training them again
    d0 = min(s.decay_epochs, default=0)
    if 0 < d0 < s.epochs:
        head = {**arms["small"], "epochs": d0, "decay": "none", "decay_epochs": []}
        for seed in ctx.seed_list:
            pre = ctx.config(**head, seed=seed, probes=[])
            if sum(prefix_reason(pre, c, n_train) is None for c in cfgs) >= 2:
                names.append(None)
                cfgs.append(pre)
    return Work("schedules", runs=cfgs, state={"arms": arms, "names": names})


def analyze(ctx: Context, work: Results) -> Output:
    s = ctx.opts  # options.Schedules, resolved for the preset
    arms, names, results = work.state["arms"], work.state["names"], work.runs
    n_test = ctx.test_size()
    rows = []
    correct: dict[str, list] = {a: [] for a in arms}
    plateau: dict[str, list] = {a: [] for a in arms}
    rise: dict[str, list] = {a: [] for a in arms}
    train_acc: dict[str, list] = {a: [] for a in arms}
    curves: dict[str, list] = {}
    for name, res in zip(names, results):
        if name is None:  # a shared prefix of arms, not an arm
            continue
        f = res.final
        rows.append({"arm": name, "seed": res.config.seed, "status": res.status,
                     "basis": ARMS[name][1], "batch_sizes": sorted(set(res.config.batch_sizes())),
                     "lr": res.config.lr, "epochs": res.config.epochs,
                     "warmup_epochs": res.config.warmup_epochs,
                     "ghost_batch_size": res.config.ghost_batch_size,
                     "steps": f.get("steps"), "test_acc": f.get("test_acc"),
                     "train_loss": f.get("train_loss"), "train_seconds": f.get("train_seconds")})
        correct[name].append(bits_to_array(f.get("test_correct_bits"), n_test))
        train_acc[name].append(f.get("train_acc"))
        plateau[name].append(plateau_gain(res.epochs))
        rise[name].append(train_rise(res.epochs))
        if res.config.seed == 0:
            curves[name] = res.epochs
    acc = {a: [r["test_acc"] for r in rows if r["arm"] == a] for a in arms}
    steps = {a: [r["steps"] for r in rows if r["arm"] == a] for a in arms}
    claims = schedule_claims(acc, steps, arms, float(s.tolerance), n_test, s.base_batch,
                             correct=correct, plateau=plateau, train_acc=train_acc, rise=rise)
    table = []
    for a in arms:
        rs = [r for r in rows if r["arm"] == a]
        table.append({"arm": a, "basis": ARMS[a][1], "batch_sizes": rs[0]["batch_sizes"],
                      "lr": rs[0]["lr"], "epochs": rs[0]["epochs"], "steps": _mean([r["steps"] for r in rs]),
                      "test_acc": _mean(acc[a]), "train_loss": _mean([r["train_loss"] for r in rs])})
    summary = (f"{ctx.model_name()}. Baseline: batch {s.base_batch}, lr {s.lr}, {s.epochs} epochs, lr x "
               f"{s.decay_factor} at epochs {s.decay_epochs}; large batch "
               f"{arms['large']['batch_size']}. Seeds: {ctx.seeds}.\n\n"
               + md_table(table, ["arm", "basis", "batch_sizes", "lr", "epochs", "steps",
                                  "test_acc", "train_loss"]))
    return Output(rows=rows, summary=summary, claims=claims,
                  figures={"schedules.png": figure(curves)})


def plateau_gain(epochs: list[dict[str, Any]]) -> float | None:
    """A run's train-accuracy change over the last fifth of its epochs (at least one epoch):
    ~0 once it has converged. Counted in epochs, not evaluations: a run evaluated every k
    epochs (`TrainConfig.eval_every`, which always evaluates the start of the last fifth,
    `plateau_start`) gives the same number as one evaluated every epoch."""
    acc = [(int(e["epoch"]), float(a)) for e in epochs
           if e.get("epoch", 0) >= 1 and isinstance(a := e.get("train_acc"), (int, float))]
    if not acc:
        return None
    last, at_last = acc[-1]
    before = [a for ep, a in acc if ep <= plateau_start(last)]
    return at_last - before[-1] if before else None


def converged(arm: str, gains: list[float | None]) -> Gate:
    """The premise of an accuracy-match claim: the arm's train accuracy has plateaued (its
    per-seed change over the last fifth of the epochs, interval over seeds, within
    +-PLATEAU_TOL). Noise can only fail a gate, so an unconverged arm makes the claim
    untestable at this budget, never 'matches'."""
    return Gate(f"{arm} converged", f"train-accuracy change of {arm} over the last fifth of its "
                "epochs", I.replicate_mean(gains, what="train-accuracy changes"),
                V.within(PLATEAU_TOL))


def train_rise(epochs: list[dict[str, Any]]) -> float | None:
    """A run's train-accuracy rise from its first evaluation (epoch 0: the initial weights) to
    its last."""
    acc = [e.get("train_acc") for e in epochs]
    acc = [float(a) for a in acc if isinstance(a, (int, float))]
    return acc[-1] - acc[0] if len(acc) >= 2 else None


def learned(arm: str, rises: list[float | None]) -> Gate:
    """The other half of "converged": the arm has trained at all (per-seed train-accuracy rise
    since the initial weights, interval over seeds, above LEARNED_MIN)."""
    return Gate(f"{arm} has learned", f"train-accuracy rise of {arm} since its initial weights",
                I.replicate_mean(rises, what="train-accuracy rises"), V.above(LEARNED_MIN))


def comparable(small: list[float | None], large: list[float | None]) -> Gate:
    """K1's premise: the generalization gap is a gap at comparable train accuracy (the
    paired train-accuracy difference, interval over seeds, within +-COMPARABLE_TOL)."""
    return Gate("comparable train accuracy", "train accuracy small - large batch, paired by seed",
                I.difference(small, large), V.within(COMPARABLE_TOL))


def schedule_claims(acc: dict[str, list], steps: dict[str, list], arms: dict[str, Any],
                    tol: float, n_test: int, base_batch: int,
                    correct: dict[str, list] | None = None,
                    plateau: dict[str, list] | None = None,
                    train_acc: dict[str, list] | None = None,
                    rise: dict[str, list] | None = None) -> list[Claim]:
    """R1-R3 as equivalence tests on the test-accuracy difference (arm - its baseline) in
    [-tol, tol], paired by seed on the shared test set (`accuracy_difference` with the runs'
    per-example correctness), each gated on both arms having converged; R1's "fewer updates"
    is a constant of Smith's design (a check, not evidence); and the gap the recipes close.
    `acc`, `steps`, `correct`, `plateau`, `train_acc`: per arm, one entry per seed in seed
    order."""
    correct = correct or {}
    plateau = plateau or {}
    train_acc = train_acc or {}

    def diff(a: str, b: str) -> Any:
        return accuracy_difference(acc[a], acc[b], n_test, correct_a=correct.get(a),
                                   correct_b=correct.get(b))

    def settled(arm: str) -> list[Gate]:
        """converged (plateaued) and, where the rises were recorded, learned."""
        gates = [converged(arm, plateau.get(arm, []))]
        return gates + ([learned(arm, rise[arm])] if rise and arm in rise else [])

    big = arms["large"]["batch_size"]
    out = [Claim(
        "gap", "S1,K1", f"at equal epochs batch {big} ends below batch {base_batch} in test "
        "accuracy (the gap the recipes must close)", diff("small", "large"), V.above(0.0),
        "test accuracy small - large batch, paired by seed", {"small": acc["small"],
                                                              "large": acc["large"]},
        reading="the gap the recipes are meant to close, at this experiment's settings",
        primary=False, gates=[*settled("small"), *settled("large"),
                              comparable(train_acc.get("small", []), train_acc.get("large", []))])]
    finding = {"goyal": "R3", "smith": "R1", "hoffer": "R2", "hoffer-gbn": "R2"}
    for arm, text in CLAIMS.items():
        if arm not in arms:
            continue
        ref, basis = ARMS[arm]
        out.append(Claim(
            f"{arm}-closes-gap", finding[arm], f"{text} ({basis})", diff(arm, ref),
            V.within(tol), f"test accuracy {arm} - {ref}, paired by seed",
            {arm: acc[arm], ref: acc[ref], "tolerance": tol,
             "plateau": {arm: plateau.get(arm), ref: plateau.get(ref)}},
            reading=("with Ghost BatchNorm, the paper's full recipe" if arm == "hoffer-gbn" else
                     "without BatchNorm (regime adaptation + sqrt lr scaling only)"
                     if arm == "hoffer" else None),
            primary=(arm != "hoffer") if arm.startswith("hoffer") else True,
            gates=[*settled(arm), *settled(ref)]))
    if "smith" in arms:
        out.append(Claim(
            "smith-fewer-updates", "R1", "increasing the batch instead of decaying the lr needs "
            "fewer parameter updates than the small-batch recipe",
            I.ratio(steps["smith"], steps["small"]), V.below(1.0),
            "updates of smith / updates of small", {"smith": steps["smith"], "small": steps["small"]},
            primary=True,
            construction="Smith's schedule multiplies the batch at each lr decay at equal epochs, "
                         "so it takes fewer updates by design, whatever the seed"))
    return out


def _mean(xs: list) -> float | None:
    v = [x for x in xs if x is not None]
    return float(np.mean(v)) if v else None


def figure(curves: dict[str, list]):
    import matplotlib.pyplot as plt

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(12, 4.2))
    for name, eps in curves.items():
        eps = [e for e in eps if e.get("test_acc") is not None]  # evaluated epochs only
        ep = [e["epoch"] for e in eps]
        acc = [e["test_acc"] for e in eps]
        st = [e.get("steps") for e in eps]
        ls = "--" if "bn" in name else "-"
        a1.plot(ep, acc, ls, label=name)
        a2.semilogx([max(x, 1) for x in st], acc, ls, label=name)
    a1.set_xlabel("epoch")
    a2.set_xlabel("steps")
    for a in (a1, a2):
        a.set_ylabel("test accuracy")
        a.set_ylim(0.8, 1.0)
        a.legend(fontsize=8)
    fig.tight_layout()
    return fig


EXPERIMENT = Experiment("schedules", "Large-batch schedule recipes (Goyal, Smith, Hoffer)", units,
                        analyze,
                        quick_options={"hidden": QUICK_HIDDEN})
