"""Loss and metric of a model on whole tensors or a streamed set, on the device, without a host
sync: the engine's per-epoch evaluation and the probes' checks use the same functions.
Classification on resident tensors (`evaluate`, NLL + accuracy) is the study's path; any other
objective or streamed data goes through `evaluate_objective` (batchlab.task)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


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


def eval_metrics(model: nn.Module, data: Any, objective: Any = None) -> dict[str, torch.Tensor]:
    """`{name}_loss` and `{name}_{metric}` (`{name}_acc` for classification) for every
    evaluation set of `data` (device tensors). Resident data and classification: `evaluate`;
    otherwise `evaluate_objective` over chunks of the tensors or batches of the stream."""
    out = {}
    streamed = getattr(data, "streamed", False)
    if not streamed and (objective is None or type(objective).__name__ == "Classification"):
        for name, (x, y) in data.eval_sets.items():
            loss, acc = evaluate(model, x, y)
            out[f"{name}_loss"], out[f"{name}_acc"] = loss, acc
        return out
    from batchlab.task import objective_for

    obj = objective_for(objective)
    device = next(model.parameters()).device
    names = data.eval_names if streamed else tuple(data.eval_sets)
    for name in names:
        batches = (data.eval_batches(name) if streamed else
                   zip(data.eval_sets[name][0].split(8192), data.eval_sets[name][1].split(8192)))
        loss, metric = evaluate_objective(model, obj, batches, device)
        out[f"{name}_loss"], out[f"{name}_{obj.metric_name}"] = loss, metric
    return out


@torch.no_grad()
def evaluate_objective(model: nn.Module, objective: Any, batches: Iterable[tuple[Any, Any]],
                       device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean per-example loss, metric) over `batches` as 0-d device tensors, in eval mode
    (restored after). Batches are moved to `device` one at a time."""
    was = model.training
    model.eval()
    loss = torch.zeros((), device=device)
    m_sum = torch.zeros((), device=device)
    m_n = torch.zeros((), device=device)
    n = 0
    try:
        for xb, yb in batches:
            xb, yb = xb.to(device, non_blocking=True), yb.to(device, non_blocking=True)
            out = model(xb)
            per = objective.per_example(out, yb)
            loss += per.sum() if per is not None else objective.loss(out, yb) * len(yb)
            s, c = objective.metric_terms(out, yb)
            m_sum += s
            m_n += c
            n += len(yb)
    finally:
        model.train(was)
    return loss / max(n, 1), objective.finish(m_sum / m_n.clamp_min(1))


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
