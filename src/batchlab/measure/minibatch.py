"""How good is a minibatch gradient? Measurements at one point in weight space.

`gradient_quality(model, x, y, batch_sizes, draws)` draws `draws` random minibatches of each
size (without replacement, seeded) and compares each minibatch gradient g_B with the
full-data gradient G: the cosine of their angle (direction accuracy, P4) and the norm of the
deviation |g_B - G| (its standard error, which sampling theory puts at ~ 1/sqrt(B): K6).

`layer_secant_curvature(model, x, y)` gives, per Linear layer, the secant curvature
||g_l|| / ||w_l|| that LARS steps inversely to, beside the top eigenvalue of the layer's
Hessian block that CBLR steps inversely to (C6: LARS as an instance of CBLR).

`batchnorm_signal(x, batch_size)` measures how much of the input a training-mode batch
normalization keeps at a given batch size (P6: at batch size 1 it keeps nothing).

The model must return log-probabilities (mean NLL loss), as everywhere in batchlab.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class GradientQuality:
    batch_size: int
    cosines: list[float] = field(default_factory=list)
    deviations: list[float] = field(default_factory=list)


def _flat_grad(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    params = [p for p in model.parameters() if p.requires_grad]
    loss = F.nll_loss(model(x), y)
    return torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params)])


def full_gradient(model: nn.Module, x: torch.Tensor, y: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
    """The mean-loss gradient over all of (x, y), summed chunk by chunk."""
    total = None
    n = len(y)
    for xs, ys in zip(x.split(chunk), y.split(chunk)):
        g = _flat_grad(model, xs, ys) * (len(ys) / n)
        total = g if total is None else total + g
    assert total is not None
    return total


def gradient_quality(model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                     batch_sizes: list[int], draws: int = 16, seed: int = 0) -> list[GradientQuality]:
    """Cosine to the full gradient and deviation norm of `draws` minibatches per size."""
    was = model.training
    model.eval()  # no dropout/batchnorm noise: only the sampling of examples varies
    G = full_gradient(model, x, y)
    gen = torch.Generator().manual_seed(seed)
    out = []
    for b in batch_sizes:
        q = GradientQuality(int(b))
        for _ in range(draws):
            idx = torch.randperm(len(y), generator=gen)[:b].to(x.device)
            g = _flat_grad(model, x.index_select(0, idx), y.index_select(0, idx))
            q.cosines.append(float(F.cosine_similarity(g, G, dim=0)))
            q.deviations.append(float((g - G).norm()))
        out.append(q)
    model.train(was)
    return out


def layer_secant_curvature(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> list[float]:
    """||dL/dW_l|| / ||W_l|| for every Linear layer's weight (LARS's implied curvature)."""
    layers = [m for m in model.modules() if isinstance(m, nn.Linear)]
    loss = F.nll_loss(model(x), y)
    grads = torch.autograd.grad(loss, [m.weight for m in layers])
    return [float(g.norm() / m.weight.detach().norm().clamp_min(1e-12)) for g, m in zip(grads, layers)]


def batchnorm_signal(x: torch.Tensor, batch_size: int, draws: int = 64, seed: int = 0) -> float:
    """Fraction of the inputs' variance that survives training-mode batch normalization at
    `batch_size`: normalize `draws` random batches with their own batch statistics (what
    BatchNorm does in training) and compare the spread of the normalized values across
    examples with the spread of the raw inputs (both per feature, averaged). At batch size 1
    every normalized value is 0 (x - mean(x) over one example), so the fraction is 0."""
    gen = torch.Generator().manual_seed(seed)
    feats = x.reshape(len(x), -1).double()
    keep = feats.std(0) > 0
    feats = feats[:, keep]
    normed = []
    for _ in range(draws):
        idx = torch.randperm(len(feats), generator=gen)[:batch_size]
        xb = feats.index_select(0, idx.to(feats.device))
        mu = xb.mean(0, keepdim=True)
        var = xb.var(0, unbiased=False, keepdim=True)
        normed.append((xb - mu) / torch.sqrt(var + 1e-5))
    z = torch.cat(normed)
    # variance of the normalized values relative to a unit-variance normalization
    return float(np.clip(z.var(0, unbiased=False).mean().item(), 0.0, None))
