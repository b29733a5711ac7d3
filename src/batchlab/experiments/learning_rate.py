"""learning-rate: batch 1024 at lr 0.1 beside the 64 and 1024 references at lr 0.01.

Claim S2: raising the learning rate recovers the test accuracy lost to the larger batch. The
study's words ("reaches 98%, like bs 64") are an equivalence: 1024 @ 0.1 minus 64 @ 0.01 lies
within +-ACC_TOL (primary). Secondary readings: it is at least as good (non-inferiority,
>= -ACC_TOL), and the lr is what helps (1024 @ 0.1 beats 1024 @ 0.01). Every difference is
paired by seed on the shared test set; "reaches" compares where the arms end up, so each claim
is gated on its arms having converged (`study.converged`) and is `untestable` otherwise.
"""

from __future__ import annotations

from batchlab.errors import ConfigError
from batchlab.experiments.base import Context, Experiment, Output
from batchlab.experiments.claims import Claim
from batchlab.experiments.outputs import md_table
from batchlab.experiments.study import (
    ACC_METRICS,
    ACC_TOL,
    BASE_LR,
    SET_1024_LR,
    Study,
    acc_difference,
    acc_interval,
    converged_all,
    curves_csv,
    per_seed,
    pm,
    run_rows,
)
from batchlab.experiments.study_figures import accuracy_figure, zoom_floor
from batchlab.experiments.verdicts import above, within
from batchlab.experiments.work import Results, Work

NAME = "learning-rate"
METRICS = ("train_acc", "test_acc", "train_loss", "test_loss", "dist_init")


def label(bs: int, lr: float) -> str:
    return f"bs {bs}, lr {lr:g}"


def units(ctx: Context) -> Work:
    """The small and the large batch at lr 0.01 and the large batch at `large_lr`."""
    st = Study(ctx)
    batches = st.distinct(st.opts.batch_sizes)
    if len(batches) != 2:
        raise ConfigError("learning-rate takes exactly two batch sizes (small, large)")
    small, large = batches
    big_lr = st.opts.large_lr
    if big_lr <= BASE_LR:
        raise ConfigError(f"large_lr must exceed the reference lr {BASE_LR}")
    cells = [(small, BASE_LR), (large, BASE_LR), (large, big_lr)]
    return st.work({label(b, lr): st.spec(b, lr) for b, lr in cells}, NAME, cells=cells)


def analyze(ctx: Context, results: Results) -> Output:
    st = Study(ctx)
    cells = results.state["cells"]
    (small, _), _, (large, big_lr) = cells
    groups = st.groups(results)
    ref, slow, fast = (groups[label(b, lr)] for b, lr in cells)
    gl = [ref, slow, fast]
    _, n_test = st.sizes(gl)

    table = [{"configuration": g.name, "steps": pm(g.final("steps"), 1, 0),
              "test acc (%)": pm(g.final("test_acc"), 100),
              "train acc (%)": pm(g.final("train_acc"), 100),
              "test loss": pm(g.final("test_loss"), 1, 4),
              "distance from init": pm(g.final("dist_init"), 1, 2)} for g in gl]
    recover = acc_difference(fast, ref, n_test)
    ev = per_seed(**{f"test_acc {g.name}": g.final("test_acc") for g in gl})
    claims = [
        Claim("lr-recovers", "S2",
              f"raising the lr to {big_lr:g} at batch {large} recovers the test accuracy of "
              f"batch {small} at lr {BASE_LR:g} (about the same accuracy)",
              recover, within(ACC_TOL), f"test accuracy of {fast.name} minus {ref.name}", ev,
              reading=f"'reaches 98%, like bs 64': equivalence within +-{ACC_TOL:g}",
              primary=True, gates=converged_all(fast, ref)),
        Claim("lr-reaches", "S2",
              f"at batch {large}, lr {big_lr:g} is at least as accurate as batch {small} at "
              f"lr {BASE_LR:g}", recover, above(-ACC_TOL),
              f"test accuracy of {fast.name} minus {ref.name}", ev,
              reading=f"non-inferiority: no worse than {ACC_TOL:g} below", primary=False,
              gates=converged_all(fast, ref)),
        Claim("lr-helps-large-batch", "S2", f"at batch {large}, lr {big_lr:g} beats lr {BASE_LR:g}",
              acc_difference(fast, slow, n_test), above(0.0),
              f"test accuracy of {fast.name} minus {slow.name}", ev,
              reading="the recovery comes from the lr", primary=False,
              gates=converged_all(fast, slow)),
    ]
    numbers = [st.number("S2", "test accuracy", SET_1024_LR, acc_interval(fast, n_test), [fast],
                         f"bs {large} lr {big_lr:g}, {st.epochs} epochs (study 30 on 60k)")]
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
                  study_numbers=numbers,
                  extra_files={"curves.csv": curves_csv(groups, (*ACC_METRICS, "dist_init"))})


EXPERIMENT = Experiment(NAME, "A larger learning rate recovers large-batch accuracy", units,
                        analyze,
                        "Batch 1024 at lr 0.1 beside 64 and 1024 at lr 0.01.")
