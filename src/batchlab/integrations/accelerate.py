"""The gradient noise scale in a Hugging Face Accelerate loop.

    from batchlab.integrations.accelerate import AccelerateNoiseScale
    accelerator = Accelerator(gradient_accumulation_steps=4)
    model, opt, loader = accelerator.prepare(model, opt, loader)
    gns = AccelerateNoiseScale(accelerator, model, micro_batch_size=8)
    for x, y in loader:
        with accelerator.accumulate(model):
            accelerator.backward(loss_fn(model(x), y))
            gns.step()                       # measures once per optimizer step, else no-op
            opt.step(); opt.zero_grad()

Needs `pip install 'batchlab[accelerate]'`. `MicroBatchNoiseScale` underneath: B_small = one
micro-batch of one process, B_big = the `gradient_accumulation_steps` micro-batches (each
process's pair averaged over the processes), or with one micro-batch per step the all-reduced
`.grad` of all processes (call `gns.step()` before clipping then). `accelerator.backward`
divides each micro-batch loss by the accumulation steps ("mean"); the accelerator's GradScaler
(fp16) is taken into account. The object is registered for checkpointing
(`accelerator.save_state` / `load_state` carry its averages). Numbers go to `sinks` on the main
process every `log_every` measured steps (nothing is copied to the host in between).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import nn

from batchlab.errors import BatchlabError
from batchlab.integrations.sinks import Sink, noise_metrics
from batchlab.measure.noise_micro import MicroBatchNoiseScale


class AccelerateNoiseScale:
    """B_simple in an Accelerate loop (see the module docstring); `gns` is the estimator."""

    def __init__(self, accelerator: Any, model: nn.Module, *, micro_batch_size: int,
                 beta: float = 0.99, every: int = 1, log_every: int = 50, prefix: str = "gns/",
                 sinks: Sequence[Sink] = (), register: bool = True) -> None:
        k, world = int(accelerator.gradient_accumulation_steps), int(accelerator.num_processes)
        if k * world < 2:
            raise BatchlabError("AccelerateNoiseScale needs gradient_accumulation_steps >= 2 or "
                                "more than one process; in a single-batch loop use "
                                "batchlab.GradientNoiseScale")
        self.accelerator = accelerator
        self.gns = MicroBatchNoiseScale(model, micro_batch_size=micro_batch_size,
                                        accumulation="mean", beta=beta, every=every,
                                        scaler=getattr(accelerator, "scaler", None),
                                        big_from="hooks" if k >= 2 else "grad")
        self.log_every, self.prefix, self.sinks = max(1, int(log_every)), prefix, list(sinks)
        self.logged: list[tuple[int, dict[str, float]]] = []
        self._measured = 0
        if register:
            accelerator.register_for_checkpointing(self)

    def step(self) -> None:
        """Call after each `accelerator.backward`: measures when the gradients are synced (the
        step the optimizer takes), does nothing on the accumulation steps in between."""
        if not self.accelerator.sync_gradients:
            return
        self.gns.step()
        self._measured += 1
        if (self._measured - 1) % (self.gns.every * self.log_every):
            return
        metrics = noise_metrics(self.gns, self.prefix)
        if self.accelerator.is_main_process:
            self.logged.append((self._measured, metrics))
            for s in self.sinks:
                s.log(metrics, self._measured)

    @property
    def b_simple(self) -> float:
        return self.gns.b_simple

    def state_dict(self) -> dict[str, Any]:
        return {**self.gns.state_dict(), "measured": self._measured}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._measured = int(state.get("measured", 0))
        self.gns.load_state_dict(state)

    def close(self) -> None:
        self.gns.close()
