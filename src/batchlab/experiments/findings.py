"""The checklist: every finding id of the sources (../shared/study/FINDINGS.md) with a short
title, and every number the sources report, to be shown beside batchlab's measurement in
`study_numbers.csv`.

The numbers are facts about the sources' own settings, never targets: nothing here feeds a
verdict. An experiment that measures the matching quantity returns a `StudyNumber` with its
measured interval and a note on how close its setting is (preset, dataset, epochs- or
steps-matched).
"""

from __future__ import annotations

import csv
import io
import math
from dataclasses import dataclass, replace

from batchlab.experiments.intervals import Interval

SOURCES = {
    "S": "the 2018 MNIST batch-size study",
    "K": "Keskar et al., large-batch training and sharp minima",
    "C": "large-batch training based on the second-order gradient",
    "P": "practical trade-offs of batch size",
    "G": "McCandlish et al., the gradient noise scale",
    "R": "related papers: Smith et al., Hoffer et al., Goyal et al.",
}

FINDINGS: dict[str, str] = {
    "S1": "higher batch sizes give lower asymptotic test (and train) accuracy",
    "S2": "a larger lr recovers the accuracy lost to a large batch",
    "S3": "starting with a large batch does not trap the model (switching recovers)",
    "S4": "at equal samples, the summed last-layer gradient norm grows like sqrt(b)",
    "S5": "normalized to the same mean, larger batches spread more across trials",
    "S6": "with a large batch the update size depends strongly on which samples are drawn",
    "S7": "larger batches have heavier-tailed gradient values; the centre is similar",
    "S8": "gradients are larger early in training than late",
    "S9": "better solutions lie farther from init; a large batch does not travel far enough",
    "S10": "more epochs or a larger lr compensate for a large batch",
    "S11": "for a fixed number of steps the distance travelled is limited; sublinear growth",
    "S12": "Adam finds much larger weights and generalizes worse",
    "S13": "SGD stays near the sphere of its initial radius; Adam ignores the initialization",
    "S14": "under SGD the second (middle) layer changes least",
    "S15": "gradient competition: one large-batch step is shorter than many small steps",
    "K1": "large-batch training generalizes worse at comparable train accuracy",
    "K2": "large-batch methods converge to sharp minimizers",
    "K3": "sharpness goes with the generalization gap",
    "K4": "large-batch methods cannot escape their basin (1-D interpolation)",
    "K5": "the small-batch advantage comes from gradient noise",
    "K6": "a minibatch of m costs O(m) but cuts the gradient's standard error only by sqrt(m)",
    "K7": "the safe learning rate is limited by the curvature of the loss",
    "C1": "gradient norm, update length and loss-update length change with batch size",
    "C2": "discarding small-loss samples improves large-batch generalization",
    "C3": "scheduling the batch size improves large-batch generalization",
    "C4": "a curvature-based layer-wise lr (CBLR) helps large-batch training",
    "C5": "the median-curvature lr (MCLR) performs comparably to LARS",
    "C6": "layer-wise rules such as LARS are special instances of CBLR",
    "C7": "in large-batch training the parameters tend to centre on their related minima",
    "P1": "throughput grows with batch size until the hardware saturates; memory grows too",
    "P2": "a time-optimal batch size exists between the extremes",
    "P3": "too small a batch makes training unstable and slow",
    "P4": "within a range, a larger batch gives a more accurate gradient direction",
    "P5": "batch sizes that are powers of two run faster",
    "P6": "BatchNorm is useless at batch size 1",
    "G1": "steps and examples to a target follow S_min(1 + B_crit/B), E_min(1 + B/B_crit)",
    "G2": "the simple noise scale B_simple predicts the critical batch size",
    "G3": "the noise scale grows as the loss falls",
    "R1": "increasing the batch instead of decaying the lr matches accuracy with fewer updates",
    "R2": "regime adaptation + sqrt lr scaling + Ghost BatchNorm closes the gap",
    "R3": "linear lr scaling with warmup closes the gap at equal epochs",
}


@dataclass(frozen=True)
class StudyNumber:
    """One number a source reports, and (once measured) ours beside it."""

    finding: str
    quantity: str
    setting: str
    study_value: float
    measured: Interval | None = None
    match_note: str = ""

    def with_measurement(self, measured: Interval, note: str) -> StudyNumber:
        return replace(self, measured=measured, match_note=note)

    def without_match(self, reason: str) -> StudyNumber:
        """No measurement of this run matches the source's setting: the row stays blank and
        says why (a nearby number would invite a comparison that does not hold)."""
        return replace(self, measured=None, match_note=reason)

    def row(self) -> dict[str, object]:
        m = self.measured

        def num(v: float | None) -> object:
            return "" if v is None or not math.isfinite(v) else round(v, 6)

        return {"finding": self.finding, "quantity": self.quantity, "setting": self.setting,
                "study_value": self.study_value, "measured": num(m.estimate if m else None),
                "ci_lo": num(m.lo if m else None), "ci_hi": num(m.hi if m else None),
                "match_note": self.match_note or "not measured in this run"}


def _n(finding: str, quantity: str, setting: str, value: float) -> StudyNumber:
    return StudyNumber(finding, quantity, setting, value)


_SETTINGS = {
    "bs64": "SGD bs 64 lr 0.01 30 epochs",
    "bs1024": "SGD bs 1024 lr 0.01 30 epochs",
    "bs1024lr": "SGD bs 1024 lr 0.1 30 epochs",
    "bs1024long": "SGD bs 1024 lr 0.01 480 epochs",
    "adam": "Adam bs 64 lr 0.01 30 epochs",
}

STUDY_NUMBERS: list[StudyNumber] = [
    # S1: accuracies by batch size
    _n("S1", "test accuracy", _SETTINGS["bs64"], 0.98),
    _n("S1", "train accuracy", _SETTINGS["bs64"], 1.00),
    _n("S1", "test accuracy", _SETTINGS["bs1024"], 0.955),
    _n("S1", "test accuracy", "SGD bs 2 lr 0.01 30 epochs", 0.99),
    # S2, S3
    _n("S2", "test accuracy", _SETTINGS["bs1024lr"], 0.98),
    _n("S3", "test accuracy", "bs 1024 for 1 epoch, then bs 64 for 30", 0.98),
    _n("S3", "test accuracy", "bs 1024 for 30 epochs, then bs 64 for 30", 0.98),
    _n("S3", "test accuracy", "bs 1024 for 30 epochs, then lr x10 for 30", 0.98),
    # S4: the exponent of norm ~ b^p the study reports (sqrt growth)
    _n("S4", "exponent p of |sum of gradients| ~ b^p", "1024 samples per trial, last layer", 0.5),
    # S7: the study's tail counts as fractions of the values it counted (its 1,000 trials x
    # the last layer's 10 x 1024 weights), so they sit beside a measured fraction
    _n("S7", "fraction of gradient values above the study's threshold", "b = 1024",
       1e5 / (1000 * 10 * 1024)),
    _n("S7", "fraction of gradient values above the study's threshold", "b = 2",
       1e2 / (1000 * 10 * 1024)),
    # S9/S10: distance from init (W weights, B biases) and accuracy
    _n("S9", "weight distance from init W", _SETTINGS["bs64"], 6.71),
    _n("S9", "bias distance from init B", _SETTINGS["bs64"], 0.11),
    _n("S9", "test accuracy", _SETTINGS["bs64"], 0.98),
    _n("S9", "distance of the best solutions from init", "best runs", 6.0),
    _n("S10", "weight distance from init W", _SETTINGS["bs1024long"], 6.63),
    _n("S10", "bias distance from init B", _SETTINGS["bs1024long"], 0.11),
    _n("S10", "test accuracy", _SETTINGS["bs1024long"], 0.98),
    # S12: Adam
    _n("S12", "weight distance from init W", _SETTINGS["adam"], 254.3),
    _n("S12", "bias distance from init B", _SETTINGS["adam"], 18.3),
    _n("S12", "test accuracy", _SETTINGS["adam"], 0.95),
    # S13: distance to the origin, accuracies, per-layer cosine(init, final)
    _n("S13", "initial weight norm", "Glorot-uniform 784-1024-1024-10", 44.0),
    _n("S13", "weight distance to origin W", _SETTINGS["bs64"], 44.9),
    _n("S13", "bias distance to origin B", _SETTINGS["bs64"], 0.11),
    _n("S13", "test accuracy", _SETTINGS["bs64"], 0.98),
    _n("S13", "weight distance to origin W", _SETTINGS["bs1024"], 44.1),
    _n("S13", "bias distance to origin B", _SETTINGS["bs1024"], 0.07),
    _n("S13", "test accuracy", _SETTINGS["bs1024"], 0.95),
    _n("S13", "weight distance to origin W", _SETTINGS["bs1024lr"], 44.7),
    _n("S13", "bias distance to origin B", _SETTINGS["bs1024lr"], 0.10),
    _n("S13", "test accuracy", _SETTINGS["bs1024lr"], 0.98),
    _n("S13", "weight distance to origin W", _SETTINGS["bs1024long"], 44.9),
    _n("S13", "bias distance to origin B", _SETTINGS["bs1024long"], 0.11),
    _n("S13", "test accuracy", _SETTINGS["bs1024long"], 0.98),
    _n("S13", "weight distance to origin W", _SETTINGS["adam"], 258.0),
    _n("S13", "bias distance to origin B", _SETTINGS["adam"], 18.3),
    _n("S13", "test accuracy", _SETTINGS["adam"], 0.95),
    *[_n("S13", f"cosine(init, final) layer {i + 1}", _SETTINGS[k], v)
      for k, vals in (("bs64", (0.988, 0.993, 0.928)), ("bs1024", (0.998, 0.998, 0.978)),
                      ("bs1024lr", (0.991, 0.994, 0.936)), ("bs1024long", (0.989, 0.993, 0.930)),
                      ("adam", (0.124, 0.359, 0.153)))
      for i, v in enumerate(vals)],
    # G3
    _n("G3", "critical batch size B_crit late in training", "MNIST (McCandlish et al.)", 1e3),
]


def key(n: StudyNumber) -> tuple[str, str, str]:
    return (n.finding, n.quantity, n.setting)


def template(finding: str, quantity: str, setting: str) -> StudyNumber:
    """The registry entry an experiment fills (KeyError if the source reports no such number)."""
    for n in STUDY_NUMBERS:
        if key(n) == (finding, quantity, setting):
            return n
    raise KeyError(f"no study number {finding} / {quantity} / {setting}")


def merge(measured: list[StudyNumber]) -> list[StudyNumber]:
    """Every registry number, with the measurement where one was made (the first measured one
    wins; else the first reason why none matches)."""
    got: dict[tuple[str, str, str], StudyNumber] = {}
    for m in measured:
        if m.measured is not None and (key(m) not in got or got[key(m)].measured is None):
            got[key(m)] = m
        else:
            got.setdefault(key(m), m)
    return [got.get(key(n), n) for n in STUDY_NUMBERS]


def to_csv(numbers: list[StudyNumber]) -> str:
    buf = io.StringIO()
    cols = ["finding", "quantity", "setting", "study_value", "measured", "ci_lo", "ci_hi",
            "match_note"]
    w = csv.DictWriter(buf, fieldnames=cols)
    w.writeheader()
    for n in numbers:
        w.writerow(n.row())
    return buf.getvalue()
