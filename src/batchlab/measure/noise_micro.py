"""B_simple where large models train: gradient accumulation and data parallelism, from the
gradients the loop computes anyway (McCandlish et al., appendix A; the gpt-neox practice).

    gns = MicroBatchNoiseScale(model, micro_batch_size=8)     # model: plain or DDP-wrapped
    for step in range(steps):
        for x, y in micro_batches:                            # k micro-batches per step
            (loss_fn(model(x), y) / k).backward()             # DDP: no_sync() but for the last
        gns.step()                                            # before clipping and zero_grad
        opt.step(); opt.zero_grad()
    gns.b_simple, gns.history

The two batch sizes are B_small = one micro-batch of one process and B_big = several of them.
|G_small|^2 is the mean squared norm of the micro-batch gradients: a hook on every trainable
parameter sees the gradient g_j each backward pass brings to it before it is added to `.grad`
(and before DDP reduces it), and adds its squared norm to a device scalar. |G_big|^2 comes
from one of two places (`big_from`):

- "hooks" (the default when a process accumulates k >= 2 micro-batches): a second hook, run
  right after a micro-batch's gradient is added to `.grad`, takes the squared norm of the sum
  S_j from the second micro-batch on (S_1 = g_1 is known); the last one is the accumulated
  gradient's |S_k|^2, read during the backward pass (while `.grad` is still in cache) and
  before anything can change it: gradient clipping before `step()` (Hugging Face's Trainer
  clips before its callbacks run) does not matter. One pass over `.grad` per later
  micro-batch, where the sum of the cross terms 2 g_j . S_{j-1} would cost two.
  B_big = k micro-batches; under DDP each rank's pair is averaged over the ranks (one
  all-reduce of two scalars).
- "grad" (the default with one micro-batch per process under DDP): `.grad` at `step()`, the
  accumulated gradient all-reduced over W ranks (identical on every rank), B_big = k x W
  micro-batches; call `step()` before clipping.

With E|G_B|^2 = |G|^2 + tr(Sigma)/B the
unbiased estimates of |G|^2 and tr(Sigma) follow (`gns.mccandlish_estimates`); as in
`GradientNoiseScale` each is smoothed by a bias-corrected EMA and B_simple is the ratio of the
averages.

Why this one for large models: every parameter is covered (LayerNorm, embeddings, attention,
Hugging Face `Conv1D`, tied weights: a parameter used twice gets one hook call with its summed
gradient), there is no extra backward pass and no per-example rule, and the cost is one squared
norm per parameter per backward. It needs B_big > B_small: k >= 2 micro-batches or W >= 2
processes (a single-batch, single-process loop has one batch size: use `GradientNoiseScale`).

Conventions: `accumulation="mean"` when each micro-batch's loss is divided by k (Hugging Face,
Lightning, Accelerate), "sum" when it is not; each micro-batch loss is a mean over its examples.
DDP averages gradients over ranks (its default). Under DDP every rank must call `step()` (one
all-reduce of a scalar per measured step; no other collective). `scaler` (a GradScaler): its
scale is taken out of both norms. A step whose norms are not finite (the one GradScaler skips)
is recorded `skipped` and leaves the averages as they were. Nothing is read back to the host in
`step()`: numbers are computed when read.
"""

from __future__ import annotations

import math
from collections import deque
from typing import Any, Literal

import torch
from torch import nn

from batchlab.errors import BatchlabError
from batchlab.measure.gns import (
    GNSRecord,
    SmoothedNoiseScale,
    grads_unscaled,
    loss_scale,
    mccandlish_estimates,
    noise_ratio,
    sum_sq_norms,
)


class MicroBatchNoiseScale(SmoothedNoiseScale):
    """B_simple from micro-batch (or per-rank) gradients against the accumulated (or
    all-reduced) one. See the module docstring for the loop and the conventions.

    Args:
        model: the module being trained (a DDP wrapper or its module).
        micro_batch_size: examples per micro-batch on one process (B_small); `step()` may
            override it per step.
        accumulation: "mean" (micro-batch losses divided by k) or "sum".
        beta, every, max_history: as in `GradientNoiseScale`.
        scaler: a `torch.amp.GradScaler`, when the loss is scaled.
        process_group: the DDP process group (None: the default one when torch.distributed is
            initialised; a single process otherwise)."""

    def __init__(self, model: nn.Module, *, micro_batch_size: int | None = None,
                 accumulation: Literal["mean", "sum"] = "mean", beta: float = 0.99,
                 every: int = 1, max_history: int | None = None, scaler: Any = None,
                 process_group: Any = None,
                 big_from: Literal["auto", "hooks", "grad"] = "auto") -> None:
        if accumulation not in ("mean", "sum"):
            raise BatchlabError(f"accumulation must be 'mean' or 'sum', not {accumulation!r}")
        if big_from not in ("auto", "hooks", "grad"):
            raise BatchlabError(f"big_from must be 'auto', 'hooks' or 'grad', not {big_from!r}")
        if not 0.0 <= beta < 1.0:
            raise BatchlabError(f"beta must be in [0, 1), not {beta}")
        if not (isinstance(every, int) and every >= 1):
            raise BatchlabError(f"every must be a positive integer, not {every!r}")
        self.model = model
        self.params = [p for p in model.parameters() if p.requires_grad]
        if not self.params:
            raise BatchlabError("the model has no trainable parameters")
        self.micro_batch_size, self.accumulation = micro_batch_size, accumulation
        self.beta, self.every, self.scaler, self.group = beta, every, scaler, process_group
        self.big_from = big_from
        self._t = 0
        self._active = True
        # per hook call |g_j|; per parameter |S_1| = |g_1| and the latest |S_j| (0-d tensors,
        # summed at step(): few kernels here)
        self._norms: list[torch.Tensor] = []
        self._first: dict[int, torch.Tensor] = {}
        self._acc: dict[int, torch.Tensor] = {}
        self._calls: dict[int, int] = {}
        self._pending: list[tuple[int, int, int, torch.Tensor]] = []
        self._history: deque[GNSRecord] = deque(maxlen=max_history)
        self._ema_g = self._ema_s = 0.0
        self._n_ema = 0
        self._handles = [p.register_hook(self._hook(i, p)) for i, p in enumerate(self.params)]
        self._handles += [p.register_post_accumulate_grad_hook(self._after(i))
                          for i, p in enumerate(self.params)]

    coverage = 1.0
    """Every trainable parameter is in both norms."""

    def _hook(self, i: int, p: nn.Parameter):  # noqa: ANN202 - returns a tensor hook
        def on_grad(g: torch.Tensor) -> None:
            if not self._active:
                return
            n = torch.linalg.vector_norm(g.detach())
            self._norms.append(n)
            c = self._calls.get(i, 0) + 1
            self._calls[i] = c
            if c == 1:
                # S_1 = g_1 unless `.grad` held something (zeros after zero_grad(set_to_none=False))
                self._first[i] = n if p.grad is None else None
        return on_grad

    def _after(self, i: int):  # noqa: ANN202 - returns a post-accumulate-grad hook
        def on_accumulated(p: nn.Parameter) -> None:
            if self._active and self.big_from != "grad" and (
                    self._calls.get(i, 0) >= 2 or self._first.get(i, 0) is None):
                self._acc[i] = torch.linalg.vector_norm(p.grad.detach())
        return on_accumulated

    def _world(self) -> int:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            return dist.get_world_size(self.group)
        return 1

    def step(self, micro_batch_size: int | None = None) -> None:
        """Record the optimizer step whose micro-batch backward passes just ran (call it
        before gradient clipping and `zero_grad`, on every rank)."""
        t = self._t
        self._t += 1
        measured = t % self.every == 0
        self._active = self._t % self.every == 0  # whether the next step is measured
        norms, first, acc, calls = self._norms, self._first, self._acc, self._calls
        self._norms, self._first, self._acc, self._calls = [], {}, {}, {}
        if not measured:
            return
        b = micro_batch_size or self.micro_batch_size
        if not b or b < 1:
            raise BatchlabError("MicroBatchNoiseScale needs micro_batch_size (examples per "
                                "micro-batch on one process)")
        if not norms:
            raise BatchlabError("gns.step() found no backward pass since the last step: call "
                                "it after the micro-batches' backward passes, once per "
                                "optimizer step")
        k = max(calls.values())
        w = self._world()
        if k * w < 2:
            raise BatchlabError("one micro-batch on one process has a single batch size: "
                                "accumulate >= 2 micro-batches, run >= 2 processes, or use "
                                "GradientNoiseScale (per-example gradients)")
        use_hooks = self.big_from == "hooks" or (self.big_from == "auto" and k >= 2)
        if use_hooks and k < 2:
            raise BatchlabError("big_from='hooks' needs >= 2 micro-batches per process")
        dev = norms[0].device
        # one stack and one float64 reduction each (a model spread over devices: moved first)
        if any(v.device != dev for v in norms):
            norms = [v.to(dev) for v in norms]
        sq = torch.linalg.vector_norm(torch.stack(norms), dtype=torch.float64).square()
        if use_hooks:  # |S_k|^2 of each parameter, as accumulated (local, pre-clip)
            finals = [acc[i] if i in acc else first[i] for i in calls]
            if any(v is None for v in finals):
                raise BatchlabError("a gradient never reached .grad (torch.autograd.grad?): "
                                    "MicroBatchNoiseScale needs loss.backward()")
            finals = [v.to(dev) for v in finals]
            big = torch.linalg.vector_norm(torch.stack(finals), dtype=torch.float64).square()
            big_unscaled_grad = False
            b_big, ranks = b * k, w  # each rank's pair, averaged over ranks
        else:
            big = sum_sq_norms([p.grad.detach() for p in self.params if p.grad is not None]).to(dev)
            big_unscaled_grad = grads_unscaled(self.scaler)
            b_big, ranks = b * k * w, w
        if self.accumulation == "mean":
            sq = sq * (k * k)  # each micro-batch loss was divided by k; their sum is the mean
        else:
            big = big / (k * k)  # the sum of k micro-batch mean gradients
        scale = loss_scale(self.scaler)
        if scale is not None:
            inv2 = scale.to(dev, torch.float64).reciprocal().pow(2)
            sq = sq * inv2
            if not big_unscaled_grad:
                big = big * inv2
        pair = torch.stack([sq / k, big])  # this rank's mean |g_micro|^2 and |G_big|^2
        if ranks > 1:
            import torch.distributed as dist

            pair = pair.to(self.params[0].device)
            dist.all_reduce(pair, group=self.group)
            pair = pair / ranks  # (.grad's norm is the same on every rank: it stays itself)
        self._pending.append((t, b, b_big, pair))

    def _flush(self) -> None:
        if not self._pending:
            return
        values = torch.stack([v.cpu() for *_, v in self._pending]).tolist()
        for (t, bs, bb, _), (small, big) in zip(self._pending, values):
            if math.isfinite(small) and math.isfinite(big):
                g2, tr = mccandlish_estimates(small, big, bs, bb)
                self._ema_g = self.beta * self._ema_g + (1 - self.beta) * g2
                self._ema_s = self.beta * self._ema_s + (1 - self.beta) * tr
                self._n_ema += 1
                skipped = False
            else:
                g2 = tr = math.nan
                skipped = True
            gs, ss = self._smoothed()
            self._history.append(GNSRecord(step=t, batch_size=bb, g_small_sq=small, g_big_sq=big,
                                           grad_sq=g2, trace_sigma=tr,
                                           b_simple_raw=noise_ratio(tr, g2), grad_sq_smooth=gs,
                                           trace_sigma_smooth=ss, b_simple=noise_ratio(ss, gs),
                                           skipped=skipped))
        self._pending = []

    def state_dict(self) -> dict[str, Any]:
        """The averages and the step count (history left out): a resumed run goes on from
        them instead of starting the EMA over."""
        self._flush()
        return {"t": self._t, "ema_g": self._ema_g, "ema_s": self._ema_s, "n_ema": self._n_ema}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._t, self._ema_g = int(state["t"]), float(state["ema_g"])
        self._ema_s, self._n_ema = float(state["ema_s"]), int(state["n_ema"])
        self._active = self._t % self.every == 0

    def reset(self) -> None:
        self._flush()
        self._history.clear()
        self._ema_g = self._ema_s = 0.0
        self._n_ema = 0

    def close(self) -> None:
        """Remove the hooks."""
        for h in self._handles:
            h.remove()
        self._handles = []

    def __enter__(self) -> MicroBatchNoiseScale:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
