"""`batchlab.recommend(model, data, ...)`: the Python entry point, on the same task contract as
`batchlab.train` (a module or factory, any data source `train` takes, a loss), returning a
`Recommendation` instead of the JSON-able report the CLI prints."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from batchlab.errors import BatchlabError
from batchlab.task import Objective


@dataclass(frozen=True)
class Recommendation:
    """What `recommend` advises and why (`report` holds every measurement, as in the CLI's
    recommend.json)."""

    batch_size: int  # fastest to the target on this device
    batch_size_compute: int  # the largest that wastes <= 10% of examples (B <= 0.1 B_crit)
    lr: float
    lr_rule: str
    critical_batch_size: float
    critical_batch_size_source: str
    b_simple: float | None
    optimizer: str
    optimizer_note: str
    predicted_steps: float
    predicted_seconds: float
    report: dict[str, Any] = field(repr=False)

    @classmethod
    def from_report(cls, rep: dict[str, Any]) -> Recommendation:
        return cls(batch_size=int(rep["recommended_batch_size"]),
                   batch_size_compute=int(rep["recommended_batch_size_compute"]),
                   lr=float(rep["recommended_lr"]), lr_rule=rep["lr_rule"],
                   critical_batch_size=float(rep["critical_batch_size"]),
                   critical_batch_size_source=rep["critical_batch_size_source"],
                   b_simple=rep["noise_scale"].get("b_simple"), optimizer=rep["optimizer"],
                   optimizer_note=rep["optimizer_note"],
                   predicted_steps=float(rep["predicted_steps"]),
                   predicted_seconds=float(rep["predicted_seconds"]), report=rep)


def recommend(model: nn.Module | Callable[[], nn.Module], data: Any, *,
              loss: str | Objective | Callable[..., Any] | None = None, optimizer: str = "sgd",
              amp: str = "off", batch_size: int = 128, lr: float = 0.1,
              epochs: int | None = None, thorough: bool = False, tune_lr: bool = True,
              seed: int = 0, device: str = "auto", max_batch: int = 8192, store: Any = None,
              out_dir: str | Path | None = None,
              progress: Callable[[str, Any, Any], None] | None = None) -> Recommendation:
    """Which batch size and lr for this model, data, loss and optimizer on this device.

        import batchlab
        rec = batchlab.recommend(make_net, (X, y), loss="mse", optimizer="adamw")
        rec.batch_size, rec.lr, rec.lr_rule

    `model`: a module (left untouched: a copy is measured) or a factory (called after seeding
    torch with `seed`). `data`: tensors `(X, y)` / `(X, y, X_test, y_test)`, a Dataset, an
    IterableDataset (streamed, never loaded whole), a loader factory or `batchlab.task.Data`.
    `loss`: as `batchlab.train`'s (classification by default: a LogSoftmax is appended, so
    logits work). `store`: a `batchlab.Store` (or path) that keeps the throughput points.
    The measurements are those of `batchlab recommend` (see `batchlab.recommend.run`)."""
    import copy

    from batchlab.config import make_config
    from batchlab.engine.setup import resolve_device
    from batchlab.nn.factory import as_log_probs
    from batchlab.recommend.run import recommend as measure_and_decide
    from batchlab.runs.store import Store
    from batchlab.runs.training import as_data
    from batchlab.task import loss_field, objective_for

    obj = objective_for(loss)
    cfg = make_config(loss=loss_field(loss), device=device, seed=seed)
    dev = resolve_device(device)
    td = as_data(data, cfg, obj)
    if td is None:
        raise BatchlabError("recommend needs data")
    if isinstance(model, nn.Module):
        net = copy.deepcopy(model)
    else:
        torch.manual_seed(seed)
        net = model()
        if not isinstance(net, nn.Module):
            raise BatchlabError(f"the model factory returned {type(net).__name__}, not an "
                                f"nn.Module")
    net = net.to(dev)
    if obj.log_probs:
        net = as_log_probs(net)
    kw: dict[str, Any] = dict(device=dev, base_batch=batch_size, base_lr=lr, epochs=epochs,
                              thorough=thorough, seed=seed, max_batch=max_batch, tune_lr=tune_lr,
                              optimizer=optimizer, amp=amp, progress=progress,
                              objective=loss if isinstance(loss, str) or loss is None else obj,
                              out_dir=Path(out_dir) if out_dir is not None else None,
                              model_name=type(net).__name__)
    if isinstance(store, (str, Path)):
        with Store(store) as st:
            return Recommendation.from_report(measure_and_decide(net, td, store=st, **kw))
    return Recommendation.from_report(measure_and_decide(net, td, store=store, **kw))
