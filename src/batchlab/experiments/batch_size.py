"""batch-size: the study's first figure. Batch sizes 64, 256, 1024 (and 2 in the paper preset)
at lr 0.01 for E epochs; train/test accuracy and loss per epoch.

Claim S1: a higher batch size leads to lower asymptotic test (and train) accuracy. "Asymptotic"
is read as the accuracy after the last epoch; at equal epochs a larger batch also takes fewer
steps, which is exactly the study's setting (the distance experiment separates the two). The
verdict on the source's words rests on the named comparison (64 vs 1024, test accuracy); the
train accuracy and the trend over every batch size are secondary.
"""

from __future__ import annotations

from batchlab.errors import ConfigError
from batchlab.experiments import Context, Experiment, Output
from batchlab.experiments.claims import Claim
from batchlab.experiments.outputs import md_table
from batchlab.experiments.study import (
    ACC_METRICS,
    SET_64,
    SET_1024,
    Study,
    acc_difference,
    acc_interval,
    accuracy_figure,
    curves_csv,
    per_seed,
    pm,
    run_rows,
    zoom_floor,
)
from batchlab.experiments.verdicts import above, below, correlation

NAME = "batch-size"
QUICK_BATCHES = (64, 256, 1024)
PAPER_BATCHES = (2, 64, 256, 1024)
TREND_RHO = -0.5  # "falls with the batch size": Spearman rho below -0.5
METRICS = ("train_acc", "test_acc", "train_loss", "test_loss", "best_test_acc")


def name_of(bs: int) -> str:
    return f"bs {bs}"


def run(ctx: Context) -> Output:
    st = Study(ctx)
    batches = st.list_option("batch_sizes", PAPER_BATCHES if ctx.paper else QUICK_BATCHES, int)
    if len(batches) < 2:
        raise ConfigError("batch-size needs at least two batch sizes")
    groups = st.run({name_of(b): st.spec(b) for b in batches}, label=NAME)
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
    xs = [b for b, g in zip(batches, gl) for _ in g.runs]
    ys = [v for g in gl for v in g.final("test_acc")]
    claims = [
        Claim("bs-test-acc", "S1",
              f"a higher batch size gives a lower final test accuracy ({small} vs {large})",
              acc_difference(gs, gL, n_test), above(0.0),
              f"test accuracy at batch {small} minus at batch {large}",
              per_seed(**{f"test_acc bs {small}": gs.final("test_acc"),
                          f"test_acc bs {large}": gL.final("test_acc")}),
              reading="asymptotic = after the last of E epochs (equal epochs)", primary=True),
        Claim("bs-train-acc", "S1",
              f"a higher batch size gives a lower final train accuracy ({small} vs {large})",
              acc_difference(gs, gL, n_train, "train_acc"), above(0.0),
              f"train accuracy at batch {small} minus at batch {large}",
              per_seed(**{f"train_acc bs {small}": gs.final("train_acc"),
                          f"train_acc bs {large}": gL.final("train_acc")}), primary=False),
        Claim("bs-test-acc-trend", "S1",
              "test accuracy falls as the batch size grows (every batch size of the grid)",
              correlation(xs, ys), below(TREND_RHO),
              "Spearman rho of final test accuracy vs batch size over runs (sizes x seeds)",
              {"batch_size": xs, "test_acc": ys}, primary=False),
    ]
    numbers = [
        st.number("S1", "test accuracy", SET_64, acc_interval(gs, n_test), [gs],
                  f"bs {small} lr 0.01, {st.epochs} epochs (study 30 on 60k)"),
        st.number("S1", "train accuracy", SET_64, acc_interval(gs, n_train, "train_acc"), [gs],
                  f"bs {small} lr 0.01, {st.epochs} epochs (study 30 on 60k)"),
        st.number("S1", "test accuracy", SET_1024, acc_interval(gL, n_test), [gL],
                  f"bs {large} lr 0.01, {st.epochs} epochs (study 30 on 60k)"),
    ]
    tiny = batches[0]
    numbers.append(st.number(
        "S1", "test accuracy", "SGD bs 2 lr 0.01 30 epochs",
        acc_interval(groups[name_of(tiny)], n_test), [groups[name_of(tiny)]],
        f"bs {tiny} lr 0.01, {st.epochs} epochs" + ("" if tiny == 2 else
                                                     " (bs 2 not run: the smallest batch run)")))
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
                                                                 "test_loss", "dist_init"))})


EXPERIMENT = Experiment(NAME, "Batch size vs accuracy (MNIST study, figure 1)", run,
                        "Batch sizes 64/256/1024 (+2 in paper) at lr 0.01: accuracy curves.")
