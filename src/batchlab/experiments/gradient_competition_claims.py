"""The study's gradient-competition findings (S4-S8, S15) as claims, in every reading.

**Replicates.** A replicate is the checkpoint of one training seed. Each claim's quantity is
computed inside a replicate (its trials summarised first: a fitted exponent, a slope, a
Kendall tau, a ratio - `gradient_competition_stats`), and the 95% interval is taken across
replicates (`intervals`): trials are never counted as n, and one seed gives an unbounded
interval that decides nothing.

**Readings, stated, not chosen.** The source does not say whether its "summed gradient" is of a
mean- or a sum-reduced loss, so every claim is made in each mode of
`batchlab.analysis.gradcomp`, beside the value that reading gives by algebra alone:

- `displacement` (the weights' distance moved / lr = the sum of mean-loss gradients): over the
  n/b steps the sum is about (n/b) x the mean per-sample gradient, so values and norm scale
  like 1/b whatever the data (exponent -1). Claims about a scale that varies with b are
  therefore decided by algebra in this reading: they are `untestable` (construction) and shown
  as checks; scale-free quantities (S5, S6, S8) equal the sample-sum reading's.
- `sample-sum` (= b x displacement: the sum of the per-sample gradients seen): the same samples
  stepped one after another (small b) or all at once (b = n). By algebra alone the sum does not
  depend on b (exponent 0), so any dependence is the data's - the trajectory moving between
  steps. This is the PRIMARY reading of every claim: the one that isolates competition.
- `sum-loss` (sum-reduced loss, lr x B per step): also 0 by algebra alone; a large b steps at
  lr x b, so its trials diverge and its exponent comes from steps near divergence. Diverged
  trials are excluded and counted in the evidence.

Every claim's evidence carries the table over readings (estimate, interval, algebra's value,
outcome), `depends_on_reading` (the readings' outcomes differ) and
`depends_on_data_reading` (they differ among the readings whose value the data decide, i.e.
leaving out the displacement reading's checks). Both checkpoints (early, late) must agree: a claim's
interval is the hull of the two regimes' intervals.

**S8's premise.** "Late in training" is gated: the late checkpoint's train accuracy must be at
least LATE_TRAIN_ACC (the study's late checkpoint, 30 epochs at batch 1024 on MNIST, sits at
about 95-96% test accuracy), else S8 is `untestable` at this budget with the reason.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from batchlab.experiments import findings
from batchlab.experiments import gradient_competition_stats as GS
from batchlab.experiments import intervals as I
from batchlab.experiments.claims import Claim, Gate
from batchlab.experiments.verdicts import Region, above, below, between, decide

PRIMARY_READING = "sample-sum"
READINGS = {
    "displacement": "the norm of the weights' displacement / lr (mean-reduced loss): scales "
                    "like 1/b by algebra alone",
    "sample-sum": "the norm of the sum of per-sample gradients (the same samples stepped one "
                  "after another vs all at once): independent of b by algebra alone",
    "sum-loss": "the norm of the summed batch gradients of a sum-reduced loss (lr x b per "
                "step): independent of b by algebra alone, but steps near divergence",
}
ALGEBRA_WHY = (
    "in the displacement reading every step's gradient is of a mean-reduced loss, so the sum "
    "over the n/b steps is about (n/b) x the mean per-sample gradient: the values and the norm "
    "scale like 1/b by algebra alone, whatever the data (the sample-sum reading, b x this one, "
    "is where the data decide)")
REGIMES = ("early", "late")
LATE_TRAIN_ACC = 0.90
"""S8's gate: the late checkpoint's train accuracy must reach this. The study's late checkpoint
(30 epochs at batch 1024 on MNIST) reaches about 95-96% test accuracy; a checkpoint below 90%
train accuracy is still in the early phase of training."""

ByB = GS.ByB


@dataclass
class Replicate:
    """The checkpoints of one training seed and every trial record measured on them."""

    seed: int | str
    recs: dict[str, ByB]  # regime -> {b: record} of the main design (fresh samples per trial)
    decomp: dict[str, ByB] = field(default_factory=dict)  # regime -> {b: record}, sets x orders
    late_train_acc: float = math.nan  # NaN: not known (user checkpoint files)


@dataclass
class Design:
    modes: list[str]
    sets: int
    orders: int


def _tables(reps: list[Replicate], mode: str) -> dict[str, list[list[dict[str, Any]]]]:
    """{regime: [per_b rows of each replicate]} of the main design."""
    return {r: [GS.per_b(rep.recs[r], mode) for rep in reps] for r in REGIMES}


def _diverged(reps: list[Replicate], mode: str) -> dict[str, Any]:
    """Diverged trials of one reading, excluded from every statistic and counted here."""
    out: dict[str, Any] = {"trials": 0, "diverged": 0, "by": []}
    for rep in reps:
        for r in REGIMES:
            for b, rec in sorted(rep.recs[r].items()):
                k = GS.diverged(rec, mode)
                out["trials"] += rec["trials"]
                out["diverged"] += k
                if k:
                    out["by"].append({"replicate": rep.seed, "regime": r, "b": b,
                                      "diverged": k, "of": rec["trials"]})
    return out


@dataclass
class Kind:
    """One claim, made in every reading: how a replicate's value is computed per regime, its
    region, and what algebra alone gives in each reading (None: algebra says nothing)."""

    key: str
    finding: str
    text: str
    quantity: str
    region: Region
    interval: Callable[[list[Replicate], str, str], tuple[I.Interval, dict[str, Any]]]
    algebra: Callable[[str, list[int]], float | None]
    scale_dependent: bool  # decided by algebra in the displacement reading


def _exponent_iv(reps: list[Replicate], regime: str, mode: str):
    tabs = [GS.per_b(rep.recs[regime], mode) for rep in reps]
    series = [([math.log(x["b"]) for x in t], [GS._log(x["mean"]) for x in t]) for t in tabs]
    ses = [GS.exponent_se(t) for t in tabs]
    return I.slope(series, "per-checkpoint exponents of log mean norm on log b"), {
        "per_replicate": [{"replicate": rep.seed, "exponent": GS.exponent(t),
                           "within_se": se} for rep, t, se in zip(reps, tabs, ses)]}


def _cv_iv(reps: list[Replicate], regime: str, mode: str):
    tabs = [GS.per_b(rep.recs[regime], mode) for rep in reps]
    series = [([math.log(x["b"]) for x in t], [GS._log(x["cv"]) for x in t]) for t in tabs]
    return I.slope(series, "per-checkpoint slopes of log cv on log b"), {
        "per_replicate": [{"replicate": rep.seed, "cv": {x["b"]: x["cv"] for x in t}}
                          for rep, t in zip(reps, tabs)]}


def _spread_iv(design: Design):
    def f(reps: list[Replicate], regime: str, mode: str):
        spreads = []
        for rep in reps:
            by_b = rep.decomp.get(regime, {})
            spreads.append({b: GS.relative_spread(_norms(rec, mode), design.sets, design.orders)
                            for b, rec in sorted(by_b.items()) if mode in rec["modes"]})
        series = [([math.log(b) for b in s], [GS._log(v) for v in s.values()]) for s in spreads]
        return I.slope(series, "per-checkpoint slopes of log relative spread across sample sets "
                               "on log b"), {
            "per_replicate": [{"replicate": rep.seed, "relative_spread": s}
                              for rep, s in zip(reps, spreads)],
            "design": f"{design.sets} sample sets x {design.orders} orders per checkpoint"}
    return f


def _norms(rec: dict[str, Any], mode: str) -> np.ndarray:
    """A record's per-trial norms in trial order, NaN where the trial diverged."""
    m = rec["modes"][mode]
    return np.array([np.nan if (x is None or bad) else x
                     for x, bad in zip(m["norms"], m["blowup"])], dtype=float)


def _tails_iv(reps: list[Replicate], regime: str, mode: str):
    series, detail = [], []
    for rep in reps:
        by_b = rep.recs[regime]
        thr = GS.common_threshold(by_b, mode)
        fr, edge = GS.tail_fractions(by_b, mode, thr)
        series.append(([float(b) for b in fr], list(fr.values())))
        detail.append({"replicate": rep.seed, "threshold": edge, "fractions": fr})
    return I.correlation(series, "per-checkpoint Kendall tau(b, fraction above the common "
                                  "threshold)"), {"per_replicate": detail}


def _centre_iv(reps: list[Replicate], regime: str, mode: str):
    tabs = [GS.per_b(rep.recs[regime], mode) for rep in reps]
    ratios = [GS.centre_ratio(t) for t in tabs]
    return I.log_mean(ratios, "per-checkpoint log ratios of median |value|, largest / smallest "
                              "b"), {
        "per_replicate": [{"replicate": rep.seed, "median_abs": {x["b"]: x["median_abs"]
                                                                  for x in t}, "ratio": q}
                          for rep, t, q in zip(reps, tabs, ratios)]}


def _exp_algebra(mode: str, bs: list[int]) -> float | None:
    return -1.0 if mode == "displacement" else 0.0


def _centre_algebra(mode: str, bs: list[int]) -> float | None:
    return (min(bs) / max(bs) if bs else math.nan) if mode == "displacement" else 1.0


def _none(mode: str, bs: list[int]) -> float | None:
    return None


def _tail_algebra(mode: str, bs: list[int]) -> float | None:
    return -1.0 if mode == "displacement" else None


def kinds(design: Design) -> list[Kind]:
    exp_q = "exponent p of mean norm ~ b^p, one least-squares fit per checkpoint (both regimes)"
    return [
        Kind("larger-batch-larger-step", "S4", "for the same samples, larger batches make larger "
             "total gradient steps", exp_q, above(0.0), _exponent_iv, _exp_algebra, True),
        Kind("norm-grows-like-sqrt-b", "S4", "the summed-gradient norm grows like sqrt(b)",
             exp_q + "; sqrt = 0.5 +- 0.15", between(0.35, 0.65), _exponent_iv, _exp_algebra,
             True),
        Kind("competition", "S15", "samples compete: one large-batch step is shorter than the "
             "many small steps over the same samples", exp_q + " (the hypothesis: it falls "
             "with b)", below(0.0), _exponent_iv, _exp_algebra, True),
        Kind("same-distance-larger-batch-varies-more", "S5", "normalized to the same mean, "
             "larger batches spread more across trials", "slope of log(std/mean of the norm) "
             "on log b, one per checkpoint", above(0.0), _cv_iv, _none, False),
        Kind("which-samples-matter-at-large-b", "S6", "with a large batch the update size "
             "depends on which samples are drawn, with a small batch much less", "slope of "
             "log(relative spread of the norm across sample sets) on log b, one per checkpoint",
             above(0.0), _spread_iv(design), _none, False),
        Kind("larger-batch-heavier-tails", "S7", "larger batches have heavier-tailed gradient "
             "values", "Kendall tau(b, fraction of values above ONE threshold common to every "
             "b), one per checkpoint", above(0.0), _tails_iv, _tail_algebra, True),
        Kind("centre-similar", "S7", "the centre of the value distribution is similar across "
             "batch sizes (median |value| within a factor 2)", "median |value| at the largest / "
             "smallest b, geometric mean over checkpoints", between(0.5, 2.0), _centre_iv,
             _centre_algebra, True),
    ]


def _ci(iv: I.Interval) -> list[float]:
    return [iv.lo, iv.hi]


def _s8(reps: list[Replicate], mode: str) -> tuple[I.Interval, dict[str, Any]]:
    """Early / late mean norm at every b, paired by checkpoint seed: the weakest b decides.
    A b where some checkpoint kept no trial in a regime (all diverged: sum-loss at large b)
    cannot be compared there; it is left out and listed, so one reading's divergence does not
    turn the whole claim into a one-seed interval."""
    bs = sorted(set.intersection(*[set(rep.recs["early"]) & set(rep.recs["late"])
                                   for rep in reps])) if reps else []
    parts, per_b, dropped = [], {}, []
    for b in bs:
        early = [GS.per_b({b: rep.recs["early"][b]}, mode)[0]["mean"] for rep in reps]
        late = [GS.per_b({b: rep.recs["late"][b]}, mode)[0]["mean"] for rep in reps]
        if not all(math.isfinite(x) and x > 0 for x in early + late):
            dropped.append(b)
            continue
        iv = I.ratio(early, late)
        parts.append(iv)
        per_b[b] = {"estimate": iv.estimate, "ci": _ci(iv)}
    return (I.all_of(parts, "batch sizes") if parts else I.nan_interval("ratio")), {
        "by_b": per_b, "dropped_b": dropped,
        "dropped_why": "some checkpoint kept no trial there (all diverged)" if dropped else ""}


def late_gate(reps: list[Replicate]) -> Gate:
    accs = [rep.late_train_acc for rep in reps]
    return Gate("late checkpoint late in training", "train accuracy at the late checkpoint",
                I.replicate_mean(accs, what="late-checkpoint train accuracies"),
                above(LATE_TRAIN_ACC))


def claims_for(reps: list[Replicate], design: Design) -> tuple[list[Claim], list[dict[str, Any]]]:
    """Every claim in every reading of `design.modes`, and the reading table (one row per
    claim and reading: estimate, interval, algebra's value, outcome)."""
    out: list[Claim] = []
    table: list[dict[str, Any]] = []
    bs = sorted(reps[0].recs["early"]) if reps else []
    for kind in kinds(design):
        modes = [m for m in design.modes
                 if kind.key != "which-samples-matter-at-large-b"
                 or any(m in rec["modes"] for rep in reps for by_b in rep.decomp.values()
                        for rec in by_b.values())]
        measured: dict[str, tuple[I.Interval, dict[str, Any]]] = {}
        for m in modes:
            parts, ev = [], {}
            for r in REGIMES:
                iv, detail = kind.interval(reps, r, m)
                parts.append(iv)
                ev[r] = {"estimate": iv.estimate, "ci": _ci(iv), "n": iv.n, **detail}
            measured[m] = (I.hull(parts, "early and late checkpoint"), ev)
        rows = _reading_rows(kind.key, kind.finding, kind.region, measured, kind.algebra, bs,
                             kind.scale_dependent)
        depends = _depends(rows)
        table += rows
        for m in modes:
            iv, ev = measured[m]
            construction = ALGEBRA_WHY if kind.scale_dependent and m == "displacement" else None
            out.append(Claim(
                f"{m}:{kind.key}", kind.finding, f"[{m}] {kind.text}", iv, kind.region,
                kind.quantity, {**ev, "diverged": _diverged(reps, m), "readings": rows,
                                **depends, "primary_reading": PRIMARY_READING},
                reading=READINGS.get(m, m), primary=m == PRIMARY_READING,
                construction=construction))
    gate = late_gate(reps)
    measured = {m: _s8(reps, m) for m in design.modes}
    rows = _reading_rows("early-larger-than-late", "S8", above(1.0), measured, _none, bs, False)
    table += rows
    for m in design.modes:
        iv, ev = measured[m]
        out.append(Claim(
            f"{m}:early-larger-than-late", "S8", f"[{m}] gradients are larger early in training "
            "than late, at every b", iv, above(1.0), "mean early / mean late norm, paired by "
            "checkpoint seed, the weakest b (all must exceed 1; a b where a checkpoint kept "
            "no trial is left out and listed)",
            {**ev, "diverged": _diverged(reps, m), "readings": rows,
             **_depends(rows),
             "primary_reading": PRIMARY_READING},
            reading=READINGS.get(m, m), primary=m == PRIMARY_READING, gates=[gate]))
    return out, table


def _depends(rows: list[dict[str, Any]]) -> dict[str, bool]:
    """Whether the outcome differs between readings: over all of them, and over the readings
    the data decide (a reading decided by algebra alone differs for a reason no data change)."""
    data = {x["data_outcome"] for x in rows if not x["by_algebra"]}
    return {"depends_on_reading": len({x["data_outcome"] for x in rows}) > 1,
            "depends_on_data_reading": len(data) > 1}


def _reading_rows(key: str, finding: str, region: Region,
                  measured: dict[str, tuple[I.Interval, dict[str, Any]]],
                  algebra: Callable[[str, list[int]], float | None], bs: list[int],
                  scale_dependent: bool) -> list[dict[str, Any]]:
    rows = []
    for m, (iv, _) in measured.items():
        alg = algebra(m, bs)
        rows.append({"kind": "reading", "claim": key, "finding": finding, "reading": m,
                     "primary": m == PRIMARY_READING, "estimate": iv.estimate, "ci_lo": iv.lo,
                     "ci_hi": iv.hi, "n": iv.n, "algebra": alg,
                     "by_algebra": scale_dependent and m == "displacement",
                     "data_outcome": decide(iv.lo, iv.hi, region, iv.estimate)})
    return rows


def study_numbers(reps: list[Replicate], claims: list[Claim], modes: list[str],
                  note: str) -> list[findings.StudyNumber]:
    """S4's exponent (primary reading) and S7's fractions above the threshold at b = 1024 and
    b = 2 (primary reading, late checkpoint); a row this run cannot match stays blank, with
    the reason."""
    out = []
    s4 = findings.template("S4", "exponent p of |sum of gradients| ~ b^p",
                           "1024 samples per trial, last layer")
    by_id = {c.id: c for c in claims}
    c = by_id.get(f"{PRIMARY_READING}:larger-batch-larger-step")
    if c is None:
        out.append(s4.without_match(f"the {PRIMARY_READING} reading was not measured "
                                    "(--set modes)"))
    else:
        others = "; ".join(f"{m}: {by_id[f'{m}:larger-batch-larger-step'].interval.estimate:.3g}"
                           for m in modes if m != PRIMARY_READING
                           and f"{m}:larger-batch-larger-step" in by_id)
        out.append(s4.with_measurement(c.interval, f"{note}; {PRIMARY_READING} reading "
                                       f"(other readings: {others or 'not measured'})"))
    quantity = "fraction of gradient values above the study's threshold"
    for b in (1024, 2):
        t = findings.template("S7", quantity, f"b = {b}")
        if PRIMARY_READING not in modes or not reps or any(b not in rep.recs["late"]
                                                           for rep in reps):
            out.append(t.without_match(f"b = {b} in the {PRIMARY_READING} reading was not "
                                       "measured in this run"))
            continue
        fr, thr = [], []
        for rep in reps:
            by_b = rep.recs["late"]
            f, edge = GS.tail_fractions(by_b, PRIMARY_READING,
                                        GS.common_threshold(by_b, PRIMARY_READING))
            fr.append(f[b])
            thr.append(edge)
        out.append(t.with_measurement(
            I.replicate_mean(fr, what="per-checkpoint fractions", clip=(0.0, 1.0)),
            f"{note}; late checkpoint, {PRIMARY_READING} reading; our threshold is "
            f"{GS.TAIL_K:g} x the RMS pooled over every b (the same for every b, "
            f"{min(thr):.3g}-{max(thr):.3g} across checkpoints), the study's is not stated: "
            "compare b = 1024 against b = 2, not the levels"))
    return out
