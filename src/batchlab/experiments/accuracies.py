"""Accuracies on ONE shared test set, as intervals over seeds (see `intervals.py`).

Every arm of an experiment is scored on the same finite test set, so its sampling error is
common to all seeds (invisible in their spread) and, for a difference of two arms, is that of
the per-example *paired* difference: the arms agree on most examples, so it is far below the
sum of two binomial variances. The engine records which test examples each run gets right
(`final["test_correct_bits"]`, a packed bitmask) so the paired variance can be computed.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from batchlab.experiments.intervals import Interval, Pooled, finite, nan_interval, replicate_mean


def bits_to_array(bits: str | None, n: int) -> np.ndarray | None:
    """Per-example correctness from the engine's packed base64 bitmask (None if absent)."""
    import base64

    if not bits:
        return None
    raw = np.frombuffer(base64.b64decode(bits), dtype=np.uint8)
    arr = np.unpackbits(raw)[:n]
    return arr.astype(float) if arr.size == n else None


def test_set_var(correct: Sequence[np.ndarray | None] | None, p: float, n_test: int,
                 minus: Sequence[np.ndarray | None] | None = None,
                 p_minus: float | None = None) -> tuple[float, str]:
    """The test set's sampling variance of a mean accuracy (or, with `minus`, of a mean
    difference of two arms' accuracies) over the seeds, and how it was obtained.

    With every run's per-example correctness: var over examples of the per-example mean
    (difference) / n_test - the paired construction; the arms agree on most examples, so this
    is far below the sum of two binomial variances. Without it: the binomial bound p(1-p)/n
    (summed over arms: assumes the arms' errors are not negatively correlated)."""
    if not n_test:
        return 0.0, "no test-set term"
    have = correct is not None and len(correct) > 0 and all(c is not None for c in correct)
    if minus is not None:
        have = have and len(minus) > 0 and all(c is not None for c in minus)
    if have:
        per = np.stack(correct)  # type: ignore[arg-type]  # [seeds, examples]
        if minus is not None:
            per = per - np.stack(minus)  # type: ignore[arg-type]
        n = per.shape[0]
        between = float(per.mean(axis=0).var(ddof=1))
        # the per-example mean over seeds still carries each seed's own noise (already in the
        # seeds' spread): subtract its share, as a random-effects ANOVA does
        within = float(per.var(axis=0, ddof=1).mean()) / n if n >= 2 else 0.0
        v = max(between - within, 0.0) / n_test
        return max(v, 1.0 / n_test**2), (f"paired per-example variance over {n_test} test "
                                         "examples (seed noise removed)")

    def binom(q: float) -> float:
        q = min(max(q, 0.0), 1.0) if math.isfinite(q) else 0.5
        return max(q * (1 - q), 1.0 / n_test) / n_test

    v = binom(p) + (binom(p_minus) if p_minus is not None else 0.0)
    return v, f"binomial bound over {n_test} test examples (no per-example record)"


def accuracy(accs: Sequence[float | None], n_test: int,
             correct: Sequence[np.ndarray | None] | None = None,
             pooled: Pooled | None = None) -> Interval:
    """An arm's mean accuracy over seeds, with the test set's sampling error."""
    a = finite(accs)
    if a.size == 0:
        return nan_interval("accuracy")
    v, how = test_set_var(correct, float(a.mean()), n_test)
    iv = replicate_mean(a.tolist(), known_var=v, pooled=pooled, what="accuracies")
    return Interval(iv.estimate, iv.lo, iv.hi, iv.n, iv.method + f"; {how}", iv.replicates,
                    iv.spec)


def accuracy_difference(a: Sequence[float | None], b: Sequence[float | None], n_test: int,
                        correct_a: Sequence[np.ndarray | None] | None = None,
                        correct_b: Sequence[np.ndarray | None] | None = None,
                        pooled: Pooled | None = None, df_rule: str = "replicates") -> Interval:
    """mean over seeds of acc_a - acc_b on ONE shared test set: the paired seed differences
    plus the per-example paired test-set variance (Satterthwaite df)."""
    keep = [i for i, (x, y) in enumerate(zip(a, b)) if x is not None and y is not None
            and math.isfinite(float(x)) and math.isfinite(float(y))]
    d = [float(a[i]) - float(b[i]) for i in keep]
    if not d:
        return nan_interval("paired accuracy difference")
    ca = [correct_a[i] for i in keep] if correct_a is not None else None
    cb = [correct_b[i] for i in keep] if correct_b is not None else None
    pa = float(np.mean([float(a[i]) for i in keep]))
    pb = float(np.mean([float(b[i]) for i in keep]))
    v, how = test_set_var(ca, pa, n_test, minus=cb, p_minus=pb)
    iv = replicate_mean(d, known_var=v, pooled=pooled, what="paired accuracy differences",
                        df_rule=df_rule)
    return Interval(iv.estimate, iv.lo, iv.hi, iv.n, iv.method + f"; {how}", iv.replicates,
                    iv.spec)


def pooled_variance(groups: Sequence[Sequence[float | None]]) -> Pooled | None:
    """The seed variance pooled over arms of one design (each arm: one value per seed), with
    its degrees of freedom sum(n_k - 1); None when no arm has two seeds."""
    ss, df = 0.0, 0
    for g in groups:
        a = finite(g)
        if a.size >= 2:
            ss += float(((a - a.mean()) ** 2).sum())
            df += int(a.size - 1)
    return Pooled(ss / df, float(df)) if df > 0 else None
