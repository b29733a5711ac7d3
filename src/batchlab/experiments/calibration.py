"""The verdict engine's error rates, measured by simulation (not argued).

Each `Kind` draws synthetic experiments with a KNOWN truth through the same interval method
the experiments use, then applies the claim rule (`claims.outcome`). A cell = (kind, number
of replicates n, truth); its result = how often each outcome came out over many draws.

Truths per kind:
- `boundary`: the effect sits exactly on the region's edge - every "reproduced" is wrong, and
  the engine promises at most 2.5%;
- `equivalence`: for equivalence regions, the truth is the centre (reproduced is right);
- `effect k`: the truth lies k replicate standard deviations inside the region (power).

`benchmarks/verdict_calibration.py` runs the full table (>= 4,000 draws per cell);
tests run a small version of the boundary cells.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from batchlab.experiments import accuracies as A
from batchlab.experiments import intervals as I
from batchlab.experiments.claims import outcome
from batchlab.experiments.verdicts import VERDICTS, Region, above, below, within

Draw = Callable[[np.random.Generator, int, float], I.Interval]


@dataclass(frozen=True)
class Kind:
    """A claim kind: its interval method on simulated replicates, the region, and the truth
    at the boundary / inside the region in units of the per-replicate spread."""

    name: str
    region: Region
    draw: Draw  # (rng, n replicates, true value) -> interval
    boundary: float
    step: float  # one replicate standard deviation, in the quantity's units (power curves)
    inside: int = 1  # direction from the boundary into the region (+1 or -1)


def _difference(rng: np.random.Generator, n: int, truth: float) -> I.Interval:
    return I.difference(rng.normal(truth, 1.0, n), np.zeros(n))


def _ratio(rng: np.random.Generator, n: int, truth: float) -> I.Interval:
    # per-replicate ratios log-normal around the true geometric-mean ratio (sd 0.3 in log)
    return I.ratio(np.exp(rng.normal(math.log(truth), 0.3, n)), np.ones(n))


N_TEST = 1000


def _accuracy(rng: np.random.Generator, n: int, truth: float,
              df_rule: str = "replicates") -> I.Interval:
    """Two arms scored on one shared test set of N_TEST examples drawn from a population of
    example difficulties; arm b is `truth` less accurate than arm a in the population. Seeds
    shift both arms (common random numbers, as a shared init does) and each arm on its own;
    within a seed the arms see the same uniforms, so they agree on most examples."""
    p = rng.beta(9.0, 1.0, N_TEST) * 0.75 + 0.1  # per-example accuracy in [0.1, 0.85]
    # examples that favour one arm (mean 0 over the population): a real test-set component;
    # bounded so that no probability leaves [0, 1] (clipping would move the truth)
    eta = rng.uniform(-0.08, 0.08, N_TEST)
    acc_a, acc_b, ca, cb = [], [], [], []
    for _ in range(n):
        u = rng.random(N_TEST)
        shared = rng.normal(0.0, 0.01)
        qa = p + shared + rng.normal(0.0, 0.002)
        qb = p + shared + rng.normal(0.0, 0.002) - truth + eta
        a, b = (u < qa).astype(float), (u < qb).astype(float)
        acc_a.append(a.mean())
        acc_b.append(b.mean())
        ca.append(a)
        cb.append(b)
    return A.accuracy_difference(acc_a, acc_b, N_TEST, ca, cb, df_rule=df_rule)


def _accuracy_satterthwaite(rng: np.random.Generator, n: int, truth: float) -> I.Interval:
    return _accuracy(rng, n, truth, df_rule="satterthwaite")


def _slope(rng: np.random.Generator, n: int, truth: float) -> I.Interval:
    """Per replicate, 5 points on log2 batch sizes 6..10 with a replicate-level slope
    deviation and point noise; the population slope is `truth`."""
    x = np.arange(6.0, 11.0)
    series = []
    for _ in range(n):
        b = truth + rng.normal(0.0, 0.5)
        series.append((x, b * x + rng.normal(0.0, 1.0, x.size)))
    return I.slope(series)


def _kendall_normal(rng: np.random.Generator, m: int, tau: float) -> tuple[np.ndarray, np.ndarray]:
    rho = math.sin(math.pi * tau / 2)  # Greiner's relation for the bivariate normal
    x = rng.normal(size=m)
    y = rho * x + math.sqrt(max(1 - rho * rho, 0.0)) * rng.normal(size=m)
    return x, y


def _correlation(m: int) -> Draw:
    def draw(rng: np.random.Generator, n: int, truth: float) -> I.Interval:
        return I.correlation([_kendall_normal(rng, m, truth) for _ in range(n)])
    return draw


def _proportion(rng: np.random.Generator, n: int, truth: float) -> I.Interval:
    return I.proportion(int(rng.binomial(n, truth)), n)


KINDS: tuple[Kind, ...] = (
    Kind("difference", above(0.0), _difference, 0.0, 1.0),
    Kind("difference (equivalence +-0.5)", within(0.5), _difference, 0.5, 1.0, inside=-1),
    Kind("paired accuracy", above(0.0), _accuracy, 0.0, 0.01),
    Kind("paired accuracy (equivalence +-0.01)", within(0.01), _accuracy, 0.01, 0.01, inside=-1),
    Kind("paired accuracy, Satterthwaite df (rejected)", above(0.0), _accuracy_satterthwaite,
         0.0, 0.01),
    Kind("ratio", above(1.0), _ratio, 1.0, 0.3),
    Kind("slope", below(0.0), _slope, 0.0, 0.5, inside=-1),
    Kind("log-mean (geometric mean)", above(1.0), lambda r, n, t: I.log_mean(
        np.exp(r.normal(math.log(t), 0.3, n))), 1.0, 0.3),
    Kind("correlation (m = 4)", above(0.5), _correlation(4), 0.5, 0.25),
    Kind("correlation (m = 10)", above(0.5), _correlation(10), 0.5, 0.15),
    Kind("proportion", above(0.5), _proportion, 0.5, 0.15),
)


def truths(kind: Kind) -> dict[str, float]:
    """The named truths of a kind: its boundary, the centre of an equivalence region, and
    effects 1, 2 and 4 replicate standard deviations into the region."""
    out = {"boundary": kind.boundary}
    r = kind.region
    if math.isfinite(r.lower) and math.isfinite(r.upper):
        out["equivalence"] = (r.lower + r.upper) / 2
    else:
        for k in (1, 2, 4):
            v = kind.boundary + kind.inside * k * kind.step
            if kind.name in ("ratio", "log-mean (geometric mean)"):
                v = kind.boundary * math.exp(k * kind.step)
            if kind.name.startswith("correlation") or kind.name == "proportion":
                v = min(v, 0.99)
            out[f"effect {k}"] = v
    return out


def run_cell(kind: Kind, n: int, truth: float, draws: int, seed: int = 0) -> dict[str, float]:
    """The fraction of each outcome over `draws` simulated experiments (a claim without gates
    or construction: untestable here means a zero-width interval)."""
    rng = np.random.default_rng(seed)
    counts = dict.fromkeys(VERDICTS, 0)
    for _ in range(draws):
        iv = kind.draw(rng, n, truth)
        verdict, _ = outcome(iv.lo, iv.hi, iv.estimate, kind.region, True, False)
        counts[verdict] += 1
    return {v: c / draws for v, c in counts.items()}


def mc_error(rate: float, draws: int) -> float:
    """One Monte-Carlo standard error of an estimated rate."""
    return math.sqrt(max(rate * (1 - rate), 1e-12) / draws)
