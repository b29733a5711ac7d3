"""learning-rate: batch 1024 at lr 0.1 beside the 64 and 1024 references at lr 0.01.

Claim: raising the learning rate recovers the test accuracy lost to the larger batch. Two
parts, each a verdict: 1024 @ 0.1 reaches 64 @ 0.01 (within a stated tolerance), and it beats
1024 @ 0.01 (so the recovery comes from the lr, not from the references being close anyway).
"""

from __future__ import annotations

from batchlab.errors import ConfigError
from batchlab.experiments import Context, Experiment, Output
from batchlab.experiments.outputs import md_table
from batchlab.experiments.study import (
    ACC_METRICS,
    BASE_LR,
    Study,
    accuracy_figure,
    claim,
    curves_csv,
    pm,
    run_rows,
    zoom_floor,
)
from batchlab.experiments.verdicts_legacy import close_to, greater

NAME = "learning-rate"
TOLERANCE = 0.005  # "recovers": within half a point of the small-batch accuracy
MIN_EFFECT = 0.005
METRICS = ("train_acc", "test_acc", "train_loss", "test_loss", "dist_init")


def label(bs: int, lr: float) -> str:
    return f"bs {bs}, lr {lr:g}"


def run(ctx: Context) -> Output:
    st = Study(ctx, extra_options=("batch_sizes", "large_lr"))
    batches = st.list_option("batch_sizes", (64, 1024), int)
    if len(batches) != 2:
        raise ConfigError("learning-rate takes exactly two batch sizes (small, large)")
    small, large = batches
    big_lr = float(st.opts.get("large_lr", 0.1))
    if big_lr <= BASE_LR:
        raise ConfigError(f"large_lr must exceed the reference lr {BASE_LR}")
    cells = [(small, BASE_LR), (large, BASE_LR), (large, big_lr)]
    groups = st.run({label(b, lr): st.spec(b, lr) for b, lr in cells}, label=NAME)
    ref, slow, fast = (groups[label(b, lr)] for b, lr in cells)
    gl = [ref, slow, fast]

    table = [{"configuration": g.name, "steps": pm(g.final("steps"), 1, 0),
              "test acc (%)": pm(g.final("test_acc"), 100),
              "train acc (%)": pm(g.final("train_acc"), 100),
              "test loss": pm(g.final("test_loss"), 1, 4),
              "distance from init": pm(g.final("dist_init"), 1, 2)} for g in gl]
    claims = [
        claim("lr-recovers",
              f"raising the lr to {big_lr:g} at batch {large} recovers the test accuracy of "
              f"batch {small} at lr {BASE_LR:g}",
              close_to(fast.final("test_acc"), ref.final("test_acc"), TOLERANCE,
                       f"final test accuracy of {fast.name} reaches that of {ref.name}")),
        claim("lr-helps-large-batch",
              f"at batch {large}, lr {big_lr:g} beats lr {BASE_LR:g}",
              greater(fast.final("test_acc"), slow.final("test_acc"), MIN_EFFECT,
                      f"final test accuracy of {fast.name} > {slow.name}")),
    ]
    summary = (f"Batch {large} at lr {big_lr:g} beside the references {ref.name} and "
               f"{slow.name}, E = {st.epochs} epochs each.\n\n" + st.header(gl)
               + "\n## Final metrics (after epoch E)\n\n" + md_table(table))
    figures = {
        "accuracy_curves.png": accuracy_figure(gl, "Learning rate vs batch size"),
        "accuracy_curves_zoom.png": accuracy_figure(gl, "Learning rate vs batch size, zoomed",
                                                    zoom=zoom_floor(gl)),
    }
    rows = run_rows(groups, METRICS, **{label(b, lr): {"batch_size": b, "lr": lr}
                                        for b, lr in cells})
    return Output(rows=rows, summary=summary, claims=claims, figures=figures,
                  extra_files={"curves.csv": curves_csv(groups, (*ACC_METRICS, "dist_init"))})


EXPERIMENT = Experiment(NAME, "A larger learning rate recovers large-batch accuracy", run,
                        "Batch 1024 at lr 0.1 beside 64 and 1024 at lr 0.01.")
