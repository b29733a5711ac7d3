"""batch-size: the study's first figure. Batch sizes 64, 256, 1024 (and 2 in the paper preset)
at lr 0.01 for E epochs; train/test accuracy and loss per epoch.

Claim: a higher batch size leads to lower asymptotic test (and train) accuracy. "Asymptotic"
is read as the accuracy after the last epoch; at equal epochs a larger batch also takes fewer
steps, which is exactly the study's setting (the distance experiment separates the two).
"""

from __future__ import annotations

from batchlab.errors import ConfigError
from batchlab.experiments import Context, Experiment, Output
from batchlab.experiments.outputs import md_table
from batchlab.experiments.study import (
    ACC_METRICS,
    Study,
    accuracy_figure,
    claim,
    curves_csv,
    mean,
    pm,
    run_rows,
    zoom_floor,
)
from batchlab.experiments.verdicts_legacy import greater, monotone

NAME = "batch-size"
QUICK_BATCHES = (64, 256, 1024)
PAPER_BATCHES = (2, 64, 256, 1024)
MIN_EFFECT = 0.005  # half a percentage point of accuracy
METRICS = ("train_acc", "test_acc", "train_loss", "test_loss", "best_test_acc")


def name_of(bs: int) -> str:
    return f"bs {bs}"


def run(ctx: Context) -> Output:
    st = Study(ctx, extra_options=("batch_sizes",))
    batches = st.list_option("batch_sizes", PAPER_BATCHES if ctx.paper else QUICK_BATCHES, int)
    if len(batches) < 2:
        raise ConfigError("batch-size needs at least two batch sizes")
    groups = st.run({name_of(b): st.spec(b) for b in batches}, label=NAME)
    gl = [groups[name_of(b)] for b in batches]

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
    claims = [
        claim("bs-test-acc",
              f"a higher batch size gives a lower final test accuracy ({small} vs {large})",
              greater(gs.final("test_acc"), gL.final("test_acc"), MIN_EFFECT,
                      f"final test accuracy at batch {small} > at batch {large}")),
        claim("bs-train-acc",
              f"a higher batch size gives a lower final train accuracy ({small} vs {large})",
              greater(gs.final("train_acc"), gL.final("train_acc"), MIN_EFFECT,
                      f"final train accuracy at batch {small} > at batch {large}")),
        claim("bs-test-acc-trend",
              "test accuracy falls monotonically as the batch size grows",
              monotone(batches, [mean(g.final("test_acc")) for g in gl], increasing=False,
                       min_effect=MIN_EFFECT,
                       what="mean final test accuracy vs batch size")),
    ]
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
                  extra_files={"curves.csv": curves_csv(groups, (*ACC_METRICS, "train_loss",
                                                                 "test_loss", "dist_init"))})


EXPERIMENT = Experiment(NAME, "Batch size vs accuracy (MNIST study, figure 1)", run,
                        "Batch sizes 64/256/1024 (+2 in paper) at lr 0.01: accuracy curves.")
