"""B_simple from two batch sizes (McCandlish et al., appendix A): the unbiased |G|^2 and
tr(Sigma) estimators from mean-loss gradients at b_small and b_big, averaged over batches.
Split from `noise.py`, which holds the per-example estimator this one is checked against."""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from batchlab.measure.noise import LossFn, NoiseEstimate, default_loss, full_grad, percentile_ci, safe_ratio


def b_simple_two_batch(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *,
                       b_small: int, b_big: int, n_batches: int,
                       loss_fn: LossFn = default_loss, n_boot: int = 1000, level: float = 0.95,
                       seed: int = 0) -> NoiseEstimate:
    """McCandlish's unbiased two-batch-size estimator (appendix A) from `n_batches` big batches
    drawn without replacement from (x, y), each split into B_big/B_small small batches.

    Needs only ordinary mini-batch gradients (the model's own mode: a BatchNorm model sees its
    batch statistics), so it works for any model."""
    if b_small < 1 or b_big <= b_small or b_big % b_small:
        raise ValueError("need 1 <= b_small < b_big with b_big a multiple of b_small")
    if b_big > len(x):
        raise ValueError(f"b_big={b_big} exceeds the {len(x)} examples available")
    gen = torch.Generator().manual_seed(seed)
    small_sq, big_sq = [], []
    for _ in range(n_batches):
        idx = torch.randperm(len(x), generator=gen)[:b_big].to(x.device)
        gsum: torch.Tensor | None = None
        s2 = 0.0
        for part in idx.split(b_small):
            g = full_grad(model, x.index_select(0, part), y.index_select(0, part), loss_fn=loss_fn)
            s2 += float(g.double().pow(2).sum())
            gsum = g.double() if gsum is None else gsum + g.double()
        k = b_big // b_small
        small_sq.append(s2 / k)
        big_sq.append(float((gsum / k).pow(2).sum()))
    gs, gb = np.asarray(small_sq), np.asarray(big_sq)

    def est(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        ms, mb = (w @ gs) / w.sum(1), (w @ gb) / w.sum(1)
        g2 = (b_big * mb - b_small * ms) / (b_big - b_small)
        tr = (ms - mb) / (1.0 / b_small - 1.0 / b_big)
        return tr, g2

    tr, g2 = est(np.ones((1, n_batches)))
    ci = (math.nan, math.nan)
    if n_boot > 0 and n_batches > 1:
        rng = np.random.default_rng(seed)
        w = rng.multinomial(n_batches, np.full(n_batches, 1.0 / n_batches), size=n_boot)
        ci = percentile_ci(safe_ratio(*est(w.astype(float))), level)
    return NoiseEstimate(b_simple=float(safe_ratio(tr, g2)[0]), grad_sq=float(g2[0]),
                         trace_sigma=float(tr[0]), n=n_batches, ci=ci,
                         method=f"two-batch ({b_small}/{b_big})", level=level)
