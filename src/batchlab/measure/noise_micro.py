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

- "hooks" (the default when a process accumulates k >= 2 micro-batches): the same hook adds
  2 g_j . grad, where `.grad` still holds the sum of the earlier micro-batches, so
  |sum_j g_j|^2 = sum_j (|g_j|^2 + 2 g_j . S_{j-1}) is the accumulated gradient's squared norm
  without reading `.grad` at the end: gradient clipping before `step()` (Hugging Face's Trainer
  clips before its callbacks run) does not matter. B_big = k micro-batches; under DDP each
  rank's pair is averaged over the ranks (one all-reduce of two scalars).
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
        # per hook call: |g| and g . S_{j-1} (0-d tensors, summed at step(): few kernels here)
        self._norms: list[torch.Tensor] = []
        self._dots: list[torch.Tensor] = []
        self._calls: dict[int, int] = {}
        self._pending: list[tuple[int, int, int, torch.Tensor]] = []
        self._history: deque[GNSRecord] = deque(maxlen=max_history)
        self._ema_g = self._ema_s = 0.0
        self._n_ema = 0
        self._handles = [p.register_hook(self._hook(i, p)) for i, p in enumerate(self.params)]

    coverage = 1.0
    """Every trainable parameter is in both norms."""

    def _hook(self, i: int, p: nn.Parameter):  # noqa: ANN202 - returns a tensor hook
        def on_grad(g: torch.Tensor) -> None:
            if not self._active:
                return
            g = g.detach()
            self._norms.append(torch.linalg.vector_norm(g))
            prev = p.grad  # the earlier micro-batches' sum: this g is not in it yet
            if prev is not None and prev.shape == g.shape:
                self._dots.append(torch.dot(g.reshape(-1), prev.detach().reshape(-1).to(g.dtype)))
            self._calls[i] = self._calls.get(i, 0) + 1
        return on_grad

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
        norms, dots, calls = self._norms, self._dots, self._calls
        self._norms, self._dots, self._calls = [], [], {}
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
        if use_hooks:  # |sum_j g_j|^2 = sum_j |g_j|^2 + 2 sum_j g_j . S_{j-1}, local, pre-clip
            big = sq + 2 * torch.stack([d.to(dev) for d in dots]).sum(dtype=torch.float64) if dots else sq
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
