"""switch: does starting with a large batch trap the model?

(a) batch 64 for E epochs (reference); (b) 1024 for 2E (control: not just more training);
(c) 1024 for 1 epoch, then 64 for E; (d) 1024 for E, then 64 for E; (e) 1024 for 2E with the
lr x10 from epoch E+1. The figure shows the last E epochs of each run, as in the study.

Claim: switching to a smaller batch or a larger lr at any time reaches the small-batch accuracy
(c, d, e each reach a within a tolerance), and it is the switch that does it (b stays below a).
"""

from __future__ import annotations

from batchlab.config import Phase
from batchlab.errors import ConfigError
from batchlab.experiments import Context, Experiment, Output
from batchlab.experiments.outputs import md_table
from batchlab.experiments.study import (
    ACC_METRICS,
    BASE_LR,
    Group,
    Study,
    accuracy_figure,
    claim,
    curves_csv,
    pm,
    run_rows,
    zoom_floor,
)
from batchlab.experiments.verdicts_legacy import close_to, combine, greater

NAME = "switch"
TOLERANCE = 0.005
MIN_EFFECT = 0.005
LR_FACTOR = 10.0
METRICS = ("train_acc", "test_acc", "train_loss", "test_loss", "dist_init")


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


def run(ctx: Context) -> Output:
    st = Study(ctx, extra_options=("batch_sizes",))
    batches = st.list_option("batch_sizes", (64, 1024), int)
    if len(batches) != 2:
        raise ConfigError("switch takes exactly two batch sizes (small, large)")
    small, large = batches
    groups = st.run(specs(st, small, large), label=NAME)
    a, b, c, d, e = groups.values()
    gl = [a, b, c, d, e]
    last = st.epochs

    table = [{"run": g.name, "epochs": len(g.runs[0].epochs) - 1,
              "steps": pm(g.final("steps"), 1, 0),
              "test acc (%)": pm(g.final("test_acc"), 100),
              "train acc (%)": pm(g.final("train_acc"), 100),
              "test loss": pm(g.final("test_loss"), 1, 4)} for g in gl]

    def reaches(g: Group) -> tuple[str, dict, str]:
        return close_to(g.final("test_acc"), a.final("test_acc"), TOLERANCE,
                        f"final test accuracy of {g.name} reaches that of {a.name}")

    parts = [reaches(g) for g in (c, d, e)]
    claims = [
        claim("switch-early", f"after 1 epoch at batch {large}, switching to {small} reaches "
              "the small-batch accuracy", parts[0]),
        claim("switch-late", f"after E epochs at batch {large}, switching to {small} reaches "
              "the small-batch accuracy", parts[1]),
        claim("switch-lr", f"after E epochs at batch {large}, raising the lr x{LR_FACTOR:g} "
              "reaches the small-batch accuracy", parts[2]),
        claim("switch-control", f"training at batch {large} for 2E epochs without a switch "
              "stays below the small-batch accuracy (the switch, not extra epochs, recovers it)",
              greater(a.final("test_acc"), b.final("test_acc"), MIN_EFFECT,
                      f"final test accuracy of {a.name} > {b.name}")),
    ]
    overall = combine([p[0] for p in parts] + [claims[-1].verdict])
    claims.append(claim(
        "switch-not-trapped", "starting with a large batch does not trap the model",
        (overall, {"parts": [cl.id for cl in claims]},
         "reproduced if switch-early, switch-late, switch-lr and switch-control are all "
         "reproduced; not reproduced if any is not; else inconclusive")))
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
                  extra_files={"curves.csv": curves_csv(groups, (*ACC_METRICS, "dist_init"))})


EXPERIMENT = Experiment(NAME, "Switching batch size or lr mid-training", run,
                        "Large batch first, then a small batch or a larger lr.")
