"""batch-size: the study's first figure. Batch sizes 64, 256, 1024 (and 2 in the paper preset)
at lr 0.01 for E epochs; train/test accuracy and loss per epoch.

Claim S1: a higher batch size leads to lower asymptotic test (and train) accuracy. Both parts
are primary: the named comparison (64 vs 1024) of final test and of final train accuracy, each
paired by seed (the test one example by example on the shared test set). "Asymptotic" is a
premise, checked by a gate: each arm's train accuracy has plateaued (`study.converged`); an arm
still climbing at the budget run (batch 1024 after a few dozen steps) makes the claim
`untestable`, not a gap. The trend over every batch size (one least-squares slope of test
accuracy on log2 batch size per seed) is a secondary reading under the same gates.

Also writes `accuracy_by_batch.csv` (batch_size, metric, estimate, lo, hi; metric test_acc or
gap = train - test accuracy), which the report draws against batch size.
"""

from __future__ import annotations

import math

from batchlab.errors import ConfigError
from batchlab.experiments import intervals as I
from batchlab.experiments.accuracies import test_set_var
from batchlab.experiments.base import Context, Experiment, Output
from batchlab.experiments.claims import Claim
from batchlab.experiments.outputs import md_table, rows_to_csv
from batchlab.experiments.study import (
    ACC_METRICS,
    SET_64,
    SET_1024,
    Group,
    Study,
    acc_difference,
    acc_interval,
    converged_all,
    curves_csv,
    per_seed,
    per_seed_series,
    pm,
    run_rows,
)
from batchlab.experiments.study_figures import accuracy_figure, zoom_floor
from batchlab.experiments.verdicts import above, below
from batchlab.experiments.work import Results, Work

NAME = "batch-size"
METRICS = ("train_acc", "test_acc", "train_loss", "test_loss", "best_test_acc")


def name_of(bs: int) -> str:
    return f"bs {bs}"


def units(ctx: Context) -> Work:
    """Every batch size of the grid at lr 0.01, with every seed."""
    st = Study(ctx)
    batches = st.distinct(st.opts.batch_sizes)
    if len(batches) < 2:
        raise ConfigError("batch-size needs at least two batch sizes")
    # kept: switch's and distance's longer runs of these configs continue them
    return st.work({name_of(b): st.spec(b) for b in batches}, NAME, keep_state=True,
                   batches=batches)


def analyze(ctx: Context, results: Results) -> Output:
    st = Study(ctx)
    batches = results.state["batches"]
    groups = st.groups(results)
    gl = [groups[name_of(b)] for b in batches]
    n_train, n_test = st.sizes(gl)

    table = []
    for b, g in zip(batches, gl):
        table.append({
            "batch size": b, "steps": pm(g.final("steps"), 1, 0),
            "test acc (%)": pm(g.final("test_acc"), 100),
            "train acc (%)": pm(g.final("train_acc"), 100),
            "best test acc (%)": pm(g.best("test_acc"), 100),
            "test loss": pm(g.final("test_loss"), 1, 4),
            "train loss": pm(g.final("train_loss"), 1, 4),
        })

    # the named comparison: 64 vs 1024 when both are there, else smallest vs largest
    small = 64 if 64 in batches and batches[-1] != 64 else batches[0]
    large = batches[-1]
    gs, gL = groups[name_of(small)], groups[name_of(large)]
    claims = s1_claims(batches, gl, small, large, gs, gL, n_train, n_test)
    numbers = [
        st.number("S1", "test accuracy", SET_64, acc_interval(gs, n_test), [gs],
                  f"bs {small} lr 0.01, {st.epochs} epochs (study 30 on 60k)"),
        st.number("S1", "train accuracy", SET_64, acc_interval(gs, n_train, "train_acc"), [gs],
                  f"bs {small} lr 0.01, {st.epochs} epochs (study 30 on 60k)"),
        st.number("S1", "test accuracy", SET_1024, acc_interval(gL, n_test), [gL],
                  f"bs {large} lr 0.01, {st.epochs} epochs (study 30 on 60k)"),
    ]
    if 2 in batches:
        numbers.append(st.number("S1", "test accuracy", "SGD bs 2 lr 0.01 30 epochs",
                                 acc_interval(groups[name_of(2)], n_test),
                                 [groups[name_of(2)]], f"bs 2 lr 0.01, {st.epochs} epochs"))
    else:  # a nearby batch size would invite a comparison with the study's bs 2 that is wrong
        numbers.append(st.no_match("S1", "test accuracy", "SGD bs 2 lr 0.01 30 epochs",
                                   f"batch size 2 was not run (batch sizes "
                                   f"{', '.join(map(str, batches))})"))
    summary = (
        f"Batch sizes {', '.join(map(str, batches))} at lr 0.01 for E = {st.epochs} epochs "
        f"(same epochs, so larger batches take fewer steps).\n\n"
        + st.header(gl) + "\n## Final metrics (after epoch E)\n\n" + md_table(table)
    )
    floor = zoom_floor(gl)
    figures = {
        "accuracy_curves.png": accuracy_figure(gl, "Batch size (lr 0.01)"),
        "accuracy_curves_zoom.png": accuracy_figure(gl, "Batch size (lr 0.01), zoomed",
                                                    zoom=floor),
    }
    rows = run_rows(groups, METRICS, **{name_of(b): {"batch_size": b, "lr": 0.01}
                                        for b in batches})
    return Output(rows=rows, summary=summary, claims=claims, figures=figures,
                  study_numbers=numbers,
                  extra_files={"curves.csv": curves_csv(groups, (*ACC_METRICS, "train_loss",
                                                                 "test_loss", "dist_init")),
                               "accuracy_by_batch.csv": rows_to_csv(
                                   accuracy_by_batch(batches, gl, n_test))})


def s1_claims(batches: list[int], gl: list[Group], small: int, large: int, gs: Group,
              gL: Group, n_train: int, n_test: int) -> list[Claim]:
    """S1's claims: the test and the train part of the named comparison (both primary) and the
    trend over every batch size (secondary), each gated on its arms having converged."""
    gates = converged_all(gs, gL)
    ev_test = per_seed(**{f"test_acc bs {small}": gs.final("test_acc"),
                          f"test_acc bs {large}": gL.final("test_acc")})
    ev_train = per_seed(**{f"train_acc bs {small}": gs.final("train_acc"),
                           f"train_acc bs {large}": gL.final("train_acc")})
    series = per_seed_series(gl, [math.log2(b) for b in batches], "test_acc")
    return [
        Claim("bs-test-acc", "S1",
              f"a higher batch size gives a lower asymptotic test accuracy ({small} vs {large})",
              acc_difference(gs, gL, n_test), above(0.0),
              f"test accuracy at batch {small} minus at batch {large}, paired by seed",
              ev_test, reading="asymptotic = after the last of E epochs (equal epochs), once "
              "both arms' train accuracy has plateaued", primary=True, gates=gates),
        Claim("bs-train-acc", "S1",
              f"a higher batch size gives a lower asymptotic train accuracy ({small} vs "
              f"{large})", acc_difference(gs, gL, n_train, "train_acc"), above(0.0),
              f"train accuracy at batch {small} minus at batch {large}, paired by seed",
              ev_train, reading="the source's '(and train)': asymptotic as above",
              primary=True, gates=gates),
        Claim("bs-test-acc-trend", "S1",
              "test accuracy falls as the batch size grows (every batch size of the grid)",
              I.slope(series, what="slopes of test accuracy on log2 batch size"), below(0.0),
              "least-squares slope of final test accuracy on log2(batch size), one per seed",
              {"batch_size": list(batches),
               **{f"test_acc bs {b}": g.final("test_acc") for b, g in zip(batches, gl)}},
              reading="the trend over the whole grid", primary=False,
              gates=converged_all(*gl)),
    ]


def accuracy_by_batch(batches: list[int], gl: list[Group], n_test: int) -> list[dict]:
    """Per batch size: the final test accuracy (with the test set's sampling error) and the
    generalization gap train - test (per-seed gaps; the test set's error added), mean and 95%
    interval over seeds."""
    rows = []
    for b, g in zip(batches, gl):
        test = acc_interval(g, n_test)
        gaps = [tr - te for tr, te in zip(g.final("train_acc"), g.final("test_acc"))]
        var, _ = test_set_var(g.correct(n_test), test.estimate, n_test)
        gap = I.replicate_mean(gaps, known_var=var, what="generalization gaps")
        for metric, iv in (("test_acc", test), ("gap", gap)):
            rows.append({"batch_size": b, "metric": metric, "estimate": _num(iv.estimate),
                         "lo": _num(iv.lo), "hi": _num(iv.hi)})
    return rows


def _num(v: float) -> float | str:
    return v if math.isfinite(v) else ""


EXPERIMENT = Experiment(NAME, "Batch size vs accuracy (MNIST study, figure 1)", units, analyze,
                        "Batch sizes 64/256/1024 (+2 in paper) at lr 0.01: accuracy curves.")
