"""Streaming statistics of gradient-competition trials: moments and two histograms of the raw
recorded values, built chunk by chunk and merged exactly, plus the blow-up rule and the
per-trial norm arrays the experiment's tables read.

The shape histogram's edges are +-HIST_RANGE x a per-(mode, b) scale fixed before most of the
data is seen: the RMS of the finite values of the non-blown-up trials of the FIRST chunk of
trials (1.0 if it has none). Chunk 0 measures it; every later chunk is given it, so chunks
computed on different machines, in any order, merge into the same histogram and the shapes
compare across b.

The magnitude histogram counts |value| in log-spaced bins with FIXED absolute edges
(LOG_PER_DECADE bins per decade from 10^LOG_MIN to 10^LOG_MAX), the same for every b, mode and
checkpoint. Why: a threshold common to every batch size (S7's tails) and the median |value|
(S7's centre) are read from it after all batch sizes are measured, so the threshold never
depends on one b's own scale; a median does not merge across chunks, counts in fixed bins do.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

HIST_RANGE = 12.0  # histogram edges: +-12 x the key's scale
HIST_BINS = 96
TAIL_K = 4.0  # S7's common threshold: TAIL_K x the RMS pooled over every batch size
LOG_MIN, LOG_MAX, LOG_PER_DECADE = -12, 8, 20  # |value| bins: 10^-12 .. 10^8, 20 per decade
LOG_BINS = (LOG_MAX - LOG_MIN) * LOG_PER_DECADE


def log_edge(i: int) -> float:
    """The lower edge of magnitude bin i (i = LOG_BINS: the top edge)."""
    return 10.0 ** (LOG_MIN + i / LOG_PER_DECADE)


@dataclass
class ValueStats:
    """Moments and a histogram of every recorded gradient value of one (mode, b)."""

    scale: float = 0.0
    count: int = 0
    nonfinite: int = 0
    sums: list[float] = field(default_factory=lambda: [0.0, 0.0, 0.0, 0.0])
    hist: list[int] = field(default_factory=lambda: [0] * HIST_BINS)
    outside: int = 0
    logabs: list[int] = field(default_factory=lambda: [0] * LOG_BINS)
    below: int = 0  # |value| < 10^LOG_MIN (zeros included)
    above: int = 0  # |value| >= 10^LOG_MAX

    def update(self, values: np.ndarray) -> None:
        v = values.astype(np.float64).ravel()
        ok = np.isfinite(v)
        self.nonfinite += int((~ok).sum())
        v = v[ok]
        if v.size == 0:
            return
        if self.scale <= 0.0:
            self.scale = rms_scale(v)
        self.count += int(v.size)
        p = v.copy()
        for i in range(4):
            self.sums[i] += float(p.sum())
            p *= v
        u = v / self.scale
        h, _ = np.histogram(u, bins=HIST_BINS, range=(-HIST_RANGE, HIST_RANGE))
        self.hist = [a + int(c) for a, c in zip(self.hist, h)]
        self.outside += int((np.abs(u) > HIST_RANGE).sum())
        a = np.abs(v)
        small = a < log_edge(0)
        big = a >= log_edge(LOG_BINS)
        self.below += int(small.sum())
        self.above += int(big.sum())
        mid = a[~small & ~big]
        idx = np.floor((np.log10(mid) - LOG_MIN) * LOG_PER_DECADE).astype(np.int64)
        counts = np.bincount(np.clip(idx, 0, LOG_BINS - 1), minlength=LOG_BINS)
        self.logabs = [x + int(c) for x, c in zip(self.logabs, counts)]

    def merge(self, other: ValueStats) -> ValueStats:
        """The statistics of both value sets (same scale: chunks of one (mode, b))."""
        if self.count and other.count and self.scale != other.scale:
            raise ValueError(f"cannot merge statistics at scales {self.scale} and {other.scale}")
        return ValueStats(scale=self.scale or other.scale, count=self.count + other.count,
                          nonfinite=self.nonfinite + other.nonfinite,
                          sums=[a + b for a, b in zip(self.sums, other.sums)],
                          hist=[a + b for a, b in zip(self.hist, other.hist)],
                          outside=self.outside + other.outside,
                          logabs=[a + b for a, b in zip(self.logabs, other.logabs)],
                          below=self.below + other.below, above=self.above + other.above)

    def summary(self) -> dict[str, float]:
        n = self.count
        if n == 0:
            return {"value_rms": math.nan, "kurtosis": math.nan, "median_abs": math.nan}
        m1, m2, m3, m4 = (s / n for s in self.sums)
        var = m2 - m1 * m1
        c4 = m4 - 4 * m1 * m3 + 6 * m1 * m1 * m2 - 3 * m1**4
        kurt = c4 / var**2 - 3.0 if var > 0 else math.nan
        return {"value_rms": math.sqrt(m2), "kurtosis": kurt, "median_abs": self.median_abs()}

    def mean_square(self) -> float:
        return self.sums[1] / self.count if self.count else math.nan

    def median_abs(self) -> float:
        """The median |value| from the magnitude histogram, interpolated geometrically inside
        its bin (a bin spans a factor 10^(1/LOG_PER_DECADE) = 1.12); NaN if no values or if
        the median lies below 10^LOG_MIN or above 10^LOG_MAX."""
        if self.count == 0:
            return math.nan
        half = self.count / 2.0
        cum = float(self.below)
        if cum >= half:
            return math.nan
        for i, c in enumerate(self.logabs):
            if c and cum + c >= half:
                frac = (half - cum) / c
                return 10.0 ** (LOG_MIN + (i + frac) / LOG_PER_DECADE)
            cum += c
        return math.nan

    def fraction_above(self, threshold: float) -> tuple[float, float]:
        """(fraction of values with |value| >= edge, edge): `threshold` rounded UP to the next
        magnitude-bin edge (at most 12% above it), so the count is exact, not interpolated."""
        if self.count == 0 or not threshold > 0:
            return math.nan, math.nan
        i = math.ceil((math.log10(threshold) - LOG_MIN) * LOG_PER_DECADE - 1e-9)
        if i <= 0:
            return (self.count - self.below) / self.count, log_edge(0)
        if i >= LOG_BINS:
            return self.above / self.count, log_edge(LOG_BINS)
        return (sum(self.logabs[i:]) + self.above) / self.count, log_edge(i)

    def to_json(self) -> dict[str, Any]:
        return {"scale": self.scale, "count": self.count, "nonfinite": self.nonfinite,
                "sums": self.sums, "hist": self.hist, "outside": self.outside,
                "logabs": self.logabs, "below": self.below, "above": self.above}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> ValueStats:
        return cls(**d)


def rms_scale(values: np.ndarray) -> float:
    """The histogram scale of a value set: its RMS over finite values (1.0 if none or 0)."""
    v = values.astype(np.float64).ravel()
    v = v[np.isfinite(v)]
    rms = float(np.sqrt(np.mean(v * v))) if v.size else 0.0
    return rms if rms > 0 else 1.0


def blown(norms: np.ndarray, max_loss: np.ndarray, limit: float) -> np.ndarray:
    """Blow-up flags: non-finite summed gradient, or a step loss non-finite or above `limit`."""
    with np.errstate(invalid="ignore"):
        return ~np.isfinite(norms) | ~np.isfinite(max_loss) | (max_loss > limit)


def finite_list(values: np.ndarray) -> list[float | None]:
    return [float(v) if math.isfinite(v) else None for v in values]


def norms_array(rec: dict[str, Any], mode: str, finite_only: bool = True) -> np.ndarray:
    """Per-trial norms of one (b, mode) record; blown-up trials dropped if `finite_only`."""
    m = rec["modes"][mode]
    v = np.array([np.nan if x is None else x for x in m["norms"]], dtype=float)
    if finite_only:
        v = v[~np.asarray(m["blowup"], dtype=bool)]
    return v
