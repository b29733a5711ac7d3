"""A PyTorch Lightning callback that measures the gradient noise scale while a model trains.

    from batchlab.integrations.lightning import GradientNoiseScaleCallback
    trainer = lightning.Trainer(callbacks=[GradientNoiseScaleCallback()])

Needs `pip install 'batchlab[lightning]'`. The estimator follows the run:

- one process, no gradient accumulation: per-example norms from layer hooks
  (`GradientNoiseScale`), after every backward pass;
- DDP (world size > 1) or `accumulate_grad_batches` > 1: micro-batch / per-rank gradients
  against the accumulated / all-reduced one (`MicroBatchNoiseScale`), once per optimizer step
  in `on_before_optimizer_step` (Lightning calls it after unscaling AMP gradients and before
  clipping). Per-example hooks are refused under DDP: `.grad` there is the gradient of all
  ranks' examples while the hooks see one rank's, which biases B_simple.

Every `log_every` measured steps it logs `gns/b_simple` (smoothed), `gns/grad_sq` and
`gns/trace_sigma` through `pl_module.log(..., rank_zero_only=True)` and to any `sinks` on global
rank zero; in between nothing is copied to the host. The values are identical on every rank
(all-reduced), so rank zero's are the run's. `state_dict`/`load_state_dict` carry the averages
through a checkpoint, so a resumed run goes on averaging; the hooks are removed when fitting
ends or raises. After fitting, `callback.gns` keeps the measurement (`history`, `coverage`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import torch

from batchlab.errors import BatchlabError
from batchlab.integrations.sinks import Sink, noise_metrics
from batchlab.measure.gns import GradientNoiseScale
from batchlab.measure.noise_micro import MicroBatchNoiseScale

try:
    import lightning.pytorch as pl
except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError("the Lightning callback needs Lightning: pip install 'batchlab[lightning]'") from e


class GradientNoiseScaleCallback(pl.Callback):
    """Measure B_simple during `trainer.fit` and log it (see the module docstring).

    Args:
        estimator: "auto" (see above), "per_example" or "micro_batch".
        reduction: how the LightningModule's loss combines examples, "mean" or "sum".
        beta, every: as in `GradientNoiseScale`.
        prefix: metric-name prefix.
        log_every: log every n-th measured step (reading the numbers syncs the host; measuring
            in between does not).
        sinks: further places for the numbers (`batchlab.integrations.sinks`), on rank zero."""

    def __init__(self, *, estimator: Literal["auto", "per_example", "micro_batch"] = "auto",
                 reduction: Literal["mean", "sum"] = "mean", beta: float = 0.99, every: int = 1,
                 prefix: str = "gns/", log_every: int = 50, sinks: Sequence[Sink] = ()) -> None:
        super().__init__()
        if estimator not in ("auto", "per_example", "micro_batch"):
            raise BatchlabError(f"estimator must be auto, per_example or micro_batch, not "
                                f"{estimator!r}")
        self.estimator, self.reduction, self.beta, self.every = estimator, reduction, beta, every
        self.prefix, self.log_every = prefix, max(1, int(log_every))
        self.sinks = list(sinks)
        self.gns: GradientNoiseScale | MicroBatchNoiseScale | None = None
        self._steps = 0  # measured steps seen (for log_every)
        self._batch: int | None = None
        self._restore: dict[str, Any] | None = None

    # -- lifecycle ---------------------------------------------------------------------------
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        world, acc = int(trainer.world_size), int(trainer.accumulate_grad_batches)
        kind = self.estimator
        if kind == "auto":
            kind = "micro_batch" if world > 1 or acc > 1 else "per_example"
        if kind == "per_example" and (world > 1 or acc > 1):
            raise BatchlabError(f"estimator='per_example' needs one process without gradient "
                                f"accumulation (world size {world}, accumulate_grad_batches "
                                f"{acc}): use estimator='micro_batch'")
        if kind == "micro_batch" and world * acc < 2:
            raise BatchlabError("estimator='micro_batch' needs accumulate_grad_batches >= 2 or "
                                "more than one process")
        self.kind = kind
        if kind == "per_example":
            self.gns = GradientNoiseScale(pl_module, reduction=self.reduction, beta=self.beta,
                                          every=self.every)
        else:
            # Lightning divides each micro-batch loss by accumulate_grad_batches ("mean")
            self.gns = MicroBatchNoiseScale(pl_module, beta=self.beta, every=self.every,
                                            accumulation="mean",
                                            scaler=getattr(trainer.precision_plugin, "scaler", None))
        if self._restore is not None:
            self.gns.load_state_dict(self._restore)
            self._restore = None
        self._steps = 0

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._close()

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                     exception: BaseException) -> None:
        self._close()

    def _close(self) -> None:
        if self.gns is not None:
            self.gns.close()
        for s in self.sinks:
            flush = getattr(s, "flush", None)
            if flush is not None:
                flush()

    # -- checkpoints -------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        if self.gns is not None:
            return dict(self.gns.state_dict())
        return dict(self._restore or {})

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if not state_dict:
            return
        if self.gns is not None:
            self.gns.load_state_dict(state_dict)
        else:
            self._restore = dict(state_dict)

    # -- measuring ---------------------------------------------------------------------------
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                             batch: Any, batch_idx: int) -> None:
        self._batch = _batch_size(batch)

    def on_after_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if isinstance(self.gns, GradientNoiseScale):
            self.gns.step()
            self._after_step(trainer, pl_module)

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                                 optimizer: torch.optim.Optimizer) -> None:
        if isinstance(self.gns, MicroBatchNoiseScale):
            self.gns.step(micro_batch_size=self._batch)
            self._after_step(trainer, pl_module)

    def _after_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        assert self.gns is not None
        self._steps += 1
        if (self._steps - 1) % (self.gns.every * self.log_every):
            return  # not measured or not logged: the numbers stay on the device (no sync)
        metrics = noise_metrics(self.gns, self.prefix)
        pl_module.log_dict(metrics, on_step=True, on_epoch=False, rank_zero_only=True)
        if trainer.is_global_zero:
            for s in self.sinks:
                s.log(metrics, trainer.global_step)


def _batch_size(batch: Any) -> int | None:
    """Examples in a batch: the first dimension of its first tensor."""
    if isinstance(batch, torch.Tensor):
        return int(batch.shape[0]) if batch.dim() else None
    if isinstance(batch, dict):
        batch = list(batch.values())
    if isinstance(batch, (list, tuple)):
        for b in batch:
            n = _batch_size(b)
            if n is not None:
                return n
    return None
