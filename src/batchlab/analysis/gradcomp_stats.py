"""Streaming statistics of gradient-competition trials: moments and a histogram of the raw
recorded values, built chunk by chunk and merged exactly, plus the blow-up rule and the
per-trial norm arrays the experiment's tables read.

The histogram's edges are +-HIST_RANGE x a per-(mode, b) scale fixed before most of the data
is seen: the RMS of the finite values of the non-blown-up trials of the FIRST chunk of trials
(1.0 if it has none). Chunk 0 measures it; every later chunk is given it, so chunks computed
on different machines, in any order, merge into the same histogram and the shapes compare
across b.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

HIST_RANGE = 12.0  # histogram edges: +-12 x the key's scale
HIST_BINS = 96
TAIL_K = 4.0  # "beyond threshold" = |value| > 4 x the key's scale


@dataclass
class ValueStats:
    """Moments and a histogram of every recorded gradient value of one (mode, b)."""

    scale: float = 0.0
    count: int = 0
    nonfinite: int = 0
    sums: list[float] = field(default_factory=lambda: [0.0, 0.0, 0.0, 0.0])
    hist: list[int] = field(default_factory=lambda: [0] * HIST_BINS)
    outside: int = 0
    tail: int = 0

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
        self.tail += int((np.abs(u) > TAIL_K).sum())

    def merge(self, other: ValueStats) -> ValueStats:
        """The statistics of both value sets (same scale: chunks of one (mode, b))."""
        if self.count and other.count and self.scale != other.scale:
            raise ValueError(f"cannot merge statistics at scales {self.scale} and {other.scale}")
        return ValueStats(scale=self.scale or other.scale, count=self.count + other.count,
                          nonfinite=self.nonfinite + other.nonfinite,
                          sums=[a + b for a, b in zip(self.sums, other.sums)],
                          hist=[a + b for a, b in zip(self.hist, other.hist)],
                          outside=self.outside + other.outside, tail=self.tail + other.tail)

    def summary(self) -> dict[str, float]:
        n = self.count
        if n == 0:
            return {"value_rms": math.nan, "kurtosis": math.nan, "tail_fraction": math.nan}
        m1, m2, m3, m4 = (s / n for s in self.sums)
        var = m2 - m1 * m1
        c4 = m4 - 4 * m1 * m3 + 6 * m1 * m1 * m2 - 3 * m1**4
        kurt = c4 / var**2 - 3.0 if var > 0 else math.nan
        return {"value_rms": math.sqrt(m2), "kurtosis": kurt, "tail_fraction": self.tail / n}

    def to_json(self) -> dict[str, Any]:
        return {"scale": self.scale, "count": self.count, "nonfinite": self.nonfinite,
                "sums": self.sums, "hist": self.hist, "outside": self.outside, "tail": self.tail}

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
