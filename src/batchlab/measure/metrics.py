"""Loss and accuracy of a model on whole tensors, on the device, without a host sync: the
engine's per-epoch evaluation and the probes' checks use the same function."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from batchlab.data import TensorData


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, chunk: int = 8192
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean NLL, accuracy) as 0-d device tensors; the model must return log-probabilities.
    Runs in eval mode (batchnorm uses its running statistics) in chunks, and restores the
    model's mode."""
    was = model.training
    model.eval()
    loss = torch.zeros((), device=x.device)
    correct = torch.zeros((), device=x.device)
    for xs, ys in zip(x.split(chunk), y.split(chunk)):
        out = model(xs)
        loss += F.nll_loss(out, ys, reduction="sum")
        correct += (out.argmax(1) == ys).sum()
    model.train(was)
    n = max(len(y), 1)
    return loss / n, correct / n


def eval_metrics(model: nn.Module, data: TensorData) -> dict[str, torch.Tensor]:
    """`{name}_loss` and `{name}_acc` for every evaluation set of `data` (device tensors)."""
    out = {}
    for name, (x, y) in data.eval_sets.items():
        loss, acc = evaluate(model, x, y)
        out[f"{name}_loss"], out[f"{name}_acc"] = loss, acc
    return out


@torch.no_grad()
def correct_bits(model: nn.Module, x: torch.Tensor, y: torch.Tensor, chunk: int = 8192) -> str:
    """Which examples the model classifies correctly, as a base64 bitmask (np.packbits order,
    one bit per example). Why: every arm of an experiment is scored on the same test set, so
    an accuracy difference's test-set error is that of the per-example *paired* difference;
    the record makes it computable (and rechecks possible) without the weights."""
    import base64

    import numpy as np

    was = model.training
    model.eval()
    hits = torch.cat([model(xs).argmax(1) == ys for xs, ys in zip(x.split(chunk), y.split(chunk))])
    model.train(was)
    return base64.b64encode(np.packbits(hits.cpu().numpy().astype(np.uint8)).tobytes()).decode()
