"""switch: does starting with a large batch trap the model?

(a) batch 64 for E epochs (reference); (b) 1024 for 2E (control: not just more training);
(c) 1024 for 1 epoch, then 64 for E; (d) 1024 for E, then 64 for E; (e) 1024 for 2E with the
lr x10 from epoch E+1. The figure shows the last E epochs of each run, as in the study.

Claim S3: switching to a smaller batch or a larger lr at any time reaches the small-batch
accuracy. Primary: c, d and e each reach a — the difference of test accuracies lies within
+-ACC_TOL (an equivalence; the study: all three reach 98%). Secondary: each is at least as good
as a - ACC_TOL (non-inferiority), and the control b (no switch, as many epochs as d and e)
stays below a, so it is the switch, not the extra epochs, that recovers the accuracy.
Differences are paired by seed on the shared test set; "reaches" compares end points, so each
claim is gated on both runs having converged (`study.converged`), else `untestable`.
"""

from __future__ import annotations

from batchlab.config import Phase
from batchlab.errors import ConfigError
from batchlab.experiments.base import Context, Experiment, Output
from batchlab.experiments.claims import Claim
from batchlab.experiments.outputs import md_table
from batchlab.experiments.study import (
    ACC_METRICS,
    ACC_TOL,
    BASE_LR,
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

NAME = "switch"
LR_FACTOR = 10.0
METRICS = ("train_acc", "test_acc", "train_loss", "test_loss", "dist_init")
# the registry's settings of the three switches (findings.STUDY_NUMBERS)
STUDY_SETTINGS = ("bs 1024 for 1 epoch, then bs 64 for 30",
                  "bs 1024 for 30 epochs, then bs 64 for 30",
                  "bs 1024 for 30 epochs, then lr x10 for 30")


def specs(st: Study, small: int, large: int) -> dict[str, dict]:
    """The five runs; (a) is the same config as batch-size's reference run."""
    e = st.epochs
    return {
        f"(a) {small} x {e}": st.spec(small),
        f"(b) {large} x {2 * e}": st.spec(large, epochs=2 * e),
        f"(c) {large} x 1 -> {small} x {e}": st.spec(
            large, epochs=e + 1,
            schedule=[Phase(epochs=1, batch_size=large), Phase(epochs=e, batch_size=small)]),
        f"(d) {large} x {e} -> {small} x {e}": st.spec(
            large, epochs=2 * e,
            schedule=[Phase(epochs=e, batch_size=large), Phase(epochs=e, batch_size=small)]),
        f"(e) {large} x {2 * e}, lr x{LR_FACTOR:g} from epoch {e + 1}": st.spec(
            large, epochs=2 * e, lr_multipliers={e + 1: LR_FACTOR}),
    }


def units(ctx: Context) -> Work:
    """The five runs of `specs`, with every seed."""
    st = Study(ctx)
    batches = st.distinct(st.opts.batch_sizes)
    if len(batches) != 2:
        raise ConfigError("switch takes exactly two batch sizes (small, large)")
    small, large = batches
    # kept: distance's long run of the large batch continues (b) (`runs.continuation`)
    return st.work(specs(st, small, large), NAME, keep_state=True, batches=batches)


def analyze(ctx: Context, results: Results) -> Output:
    st = Study(ctx)
    small, large = results.state["batches"]
    groups = st.groups(results)
    a, b, c, d, e = groups.values()
    gl = [a, b, c, d, e]
    last = st.epochs

    table = [{"run": g.name, "epochs": len(g.runs[0].epochs) - 1,
              "steps": pm(g.final("steps"), 1, 0),
              "test acc (%)": pm(g.final("test_acc"), 100),
              "train acc (%)": pm(g.final("train_acc"), 100),
              "test loss": pm(g.final("test_loss"), 1, 4)} for g in gl]

    _, n_test = st.sizes(gl)
    ev = per_seed(**{f"test_acc {g.name}": g.final("test_acc") for g in gl})
    cases = (("switch-early", c, f"after 1 epoch at batch {large}, switching to {small}"),
             ("switch-late", d, f"after E epochs at batch {large}, switching to {small}"),
             ("switch-lr", e, f"after E epochs at batch {large}, raising the lr x{LR_FACTOR:g}"))
    claims: list[Claim] = []
    for cid, g, text in cases:
        iv = acc_difference(g, a, n_test)
        what = f"test accuracy of {g.name} minus {a.name}"
        claims.append(Claim(cid, "S3", f"{text} reaches the small-batch accuracy", iv,
                            within(ACC_TOL), what, ev,
                            reading=f"'reaches 98%': equivalence within +-{ACC_TOL:g}",
                            primary=True, gates=converged_all(g, a)))
        claims.append(Claim(cid + "-at-least", "S3", f"{text} is at least as accurate as the "
                            "small batch", iv, above(-ACC_TOL), what, ev,
                            reading=f"non-inferiority: no worse than {ACC_TOL:g} below",
                            primary=False, gates=converged_all(g, a)))
    claims.append(Claim(
        "switch-control", "S3", f"training at batch {large} for 2E epochs without a switch "
        "stays below the small-batch accuracy (the switch, not extra epochs, recovers it)",
        acc_difference(a, b, n_test), above(0.0), f"test accuracy of {a.name} minus {b.name}",
        ev, reading="the study's control: bs 1024 for 60 epochs", primary=False,
        gates=converged_all(a, b)))
    numbers = [st.number("S3", "test accuracy", setting, acc_interval(g, n_test), [g],
                         f"{g.name} (study: E = 30 on 60k)")
               for setting, g in zip(STUDY_SETTINGS, (c, d, e))]
    summary = (f"Batch {small} vs {large} at lr {BASE_LR:g}, E = {st.epochs}; the figure shows "
               f"the last E epochs of each run.\n\n" + st.header(gl)
               + "\n## Final metrics\n\n" + md_table(table))
    figures = {
        "accuracy_last_epochs.png": accuracy_figure(
            gl, f"Switching batch size / lr (last {last} epochs)", last=last,
            xlabel=f"epoch within the last {last} of each run", zoom=zoom_floor(gl)),
        "accuracy_full.png": accuracy_figure(gl, "Switching batch size / lr (whole runs)"),
    }
    rows = run_rows(groups, METRICS)
    return Output(rows=rows, summary=summary, claims=claims, figures=figures,
                  study_numbers=numbers, extra_files={"curves.csv": curves_csv(groups, (*ACC_METRICS, "dist_init"))})


EXPERIMENT = Experiment(NAME, "Switching batch size or lr mid-training", units, analyze,
                        "Large batch first, then a small batch or a larger lr.")
