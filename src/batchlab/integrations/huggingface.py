"""A Hugging Face `transformers.Trainer` callback that measures the gradient noise scale.

    from batchlab.integrations.huggingface import GradientNoiseScaleCallback
    trainer = Trainer(model, args, train_dataset=ds, callbacks=[GradientNoiseScaleCallback()])
    trainer.train()
    cb.gns.b_simple, cb.gns.history

Needs `pip install 'batchlab[huggingface]'`. The Trainer runs its callbacks after it has clipped
the gradients (`max_grad_norm`, 1.0 by default), so the callback uses the estimator that does
not read the final `.grad`: `MicroBatchNoiseScale` with |G_big|^2 from its hooks, B_small =
`per_device_train_batch_size`, B_big = `gradient_accumulation_steps` of them (each process's
pair averaged over the processes under DDP). That needs gradient_accumulation_steps >= 2;
with one micro-batch per step it takes the all-reduced `.grad` of several processes, or the
per-example `GradientNoiseScale` in a single process, and both need `max_grad_norm=0` (else a
one-line error says so). For fp16 set `callback.scaler = trainer.accelerator.scaler` before
training, so steps under different loss scales average in one unit.

Logging: every `log_every` measured steps (default: `args.logging_steps`) the numbers go to
`sinks` (`batchlab.integrations.sinks`) on the main process and into `callback.logged`; in
between nothing is copied to the host. The averages are saved with Trainer checkpoints
(`ExportableState`) and restored with `restore_callback_states_from_checkpoint=True`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from batchlab.errors import BatchlabError
from batchlab.integrations.sinks import Sink, noise_metrics
from batchlab.measure.gns import GradientNoiseScale
from batchlab.measure.noise_micro import MicroBatchNoiseScale

try:
    from transformers import TrainerCallback
    from transformers.trainer_callback import ExportableState
except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError("the Hugging Face callback needs transformers: pip install "
                      "'batchlab[huggingface]'") from e


class GradientNoiseScaleCallback(TrainerCallback, ExportableState):
    """B_simple during `Trainer.train()` (see the module docstring).

    Args:
        beta, every: as in `GradientNoiseScale`.
        log_every: log every n-th measured step (None: the Trainer's `logging_steps`).
        prefix: metric-name prefix.
        sinks: where the numbers go besides `logged` (rank zero only)."""

    def __init__(self, *, beta: float = 0.99, every: int = 1, log_every: int | None = None,
                 prefix: str = "gns/", sinks: Sequence[Sink] = (),
                 gns_state: dict[str, Any] | None = None) -> None:
        self.beta, self.every, self.log_every, self.prefix = beta, every, log_every, prefix
        self.sinks = list(sinks)
        self.gns: GradientNoiseScale | MicroBatchNoiseScale | None = None
        self.gns_state = gns_state
        self.scaler: Any = None
        self.logged: list[tuple[int, dict[str, float]]] = []
        self._measured = 0

    def state(self) -> dict[str, Any]:
        st = self.gns.state_dict() if self.gns is not None else self.gns_state
        return {"args": {"beta": self.beta, "every": self.every, "log_every": self.log_every,
                         "prefix": self.prefix},
                "attributes": {"gns_state": dict(st) if st else None}}

    def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None,
                       **kwargs: Any) -> None:
        if model is None:
            raise BatchlabError("the Trainer passed no model to the callback")
        k, world = int(args.gradient_accumulation_steps), int(args.world_size)
        self._log_every = max(1, int(self.log_every or args.logging_steps or 1))
        self._measured = 0
        b = int(args.per_device_train_batch_size)
        if k >= 2:
            self.gns = MicroBatchNoiseScale(model, micro_batch_size=b, accumulation="mean",
                                            beta=self.beta, every=self.every, scaler=self.scaler,
                                            big_from="hooks")
        elif float(args.max_grad_norm or 0) > 0:
            raise BatchlabError("the gradient noise scale needs gradient_accumulation_steps >= 2 "
                                "(B_big = the accumulated micro-batches), or max_grad_norm=0: "
                                "the Trainer clips .grad before its callbacks run")
        elif world > 1:
            self.gns = MicroBatchNoiseScale(model, micro_batch_size=b, accumulation="mean",
                                            beta=self.beta, every=self.every, scaler=self.scaler,
                                            big_from="grad")
        else:
            self.gns = GradientNoiseScale(model, beta=self.beta, every=self.every,
                                          scaler=self.scaler)
        if self.gns_state:
            self.gns.load_state_dict(self.gns_state)

    def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.gns is None:
            return
        self.gns.step()
        self._measured += 1
        if (self._measured - 1) % (self.gns.every * self._log_every):
            return  # the numbers stay on the device (no host sync)
        metrics = noise_metrics(self.gns, self.prefix)
        if state.is_world_process_zero:
            step = int(state.global_step) + 1  # the step being taken
            self.logged.append((step, metrics))
            for s in self.sinks:
                s.log(metrics, step)

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.gns is not None:
            self.gns_state = dict(self.gns.state_dict())
            self.gns.close()
        for s in self.sinks:
            flush = getattr(s, "flush", None)
            if flush is not None:
                flush()
