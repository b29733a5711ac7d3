"""A PyTorch Lightning callback that logs the gradient noise scale while a model trains.

    from batchlab.integrations.lightning import GradientNoiseScaleCallback
    trainer = lightning.Trainer(callbacks=[GradientNoiseScaleCallback()])

Needs `pip install batchlab[lightning]`. After every backward pass it calls
`GradientNoiseScale.step()` and logs `gns/b_simple` (smoothed), `gns/grad_sq` and
`gns/trace_sigma` (the smoothed parts) to the trainer's logger(s); after fitting, the measurement
stays available as `callback.gns` (its `history`, `unsupported`, `coverage`).
"""

from __future__ import annotations

from typing import Literal

from batchlab.errors import BatchlabError
from batchlab.measure.gns import GradientNoiseScale

try:
    import lightning.pytorch as pl
except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError("the Lightning callback needs Lightning: pip install 'batchlab[lightning]'") from e


class GradientNoiseScaleCallback(pl.Callback):
    """Measure B_simple on every training batch and log it (see `GradientNoiseScale`).

    Args:
        reduction: how the LightningModule's loss combines examples, "mean" or "sum".
        beta, every: as in `GradientNoiseScale`.
        prefix: metric-name prefix.
        log_every: log every n-th measured step (measuring continues in between)."""

    def __init__(self, *, reduction: Literal["mean", "sum"] = "mean", beta: float = 0.99,
                 every: int = 1, prefix: str = "gns/", log_every: int = 1) -> None:
        super().__init__()
        self.options = {"reduction": reduction, "beta": beta, "every": every}
        self.prefix, self.log_every = prefix, max(1, int(log_every))
        self.gns: GradientNoiseScale | None = None
        self._steps = 0

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.accumulate_grad_batches != 1:
            raise BatchlabError("GradientNoiseScaleCallback needs accumulate_grad_batches=1 (it measures "
                                "each backward pass's batch)")
        self.gns = GradientNoiseScale(pl_module, **self.options)
        self._steps = 0

    def on_after_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.gns is None:
            return
        self.gns.step()
        self._steps += 1
        if (self._steps - 1) % (self.gns.every * self.log_every):
            return  # not measured or not logged: leave the numbers on the device (no sync)
        metrics = {"b_simple": self.gns.b_simple, "grad_sq": self.gns.grad_sq,
                   "trace_sigma": self.gns.trace_sigma}
        pl_module.log_dict({self.prefix + k: v for k, v in metrics.items()}, on_step=True, on_epoch=False)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.gns is not None:
            self.gns.close()
