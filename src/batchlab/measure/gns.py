"""The gradient noise scale B_simple inside any training loop.

    gns = batchlab.GradientNoiseScale(model)
    for x, y in loader:
        opt.zero_grad()
        loss_fn(model(x), y).backward()
        gns.step()
        opt.step()
    gns.b_simple, gns.grad_sq, gns.trace_sigma, gns.history

B_simple = tr(Sigma) / |G|^2 (McCandlish et al., "An Empirical Model of Large-Batch Training") is
estimated from every training batch with the paper's unbiased two-batch-size estimators
(appendix A), taking B_small = 1 and B_big = the batch B: |G_small|^2 is the mean squared norm of
the per-example gradients (from `ExampleNormHooks`, no per-example gradient is materialised) and
|G_big|^2 the squared norm of the batch gradient (the `.grad` the backward just wrote). Since
E|G_B|^2 = |G|^2 + tr(Sigma)/B,
    |G|^2     ~ (B |G_big|^2 - |G_small|^2) / (B - 1)
    tr(Sigma) ~ (|G_small|^2 - |G_big|^2) / (1 - 1/B)
are unbiased, but one batch's estimates are very noisy (|G|^2 is often negative), so, as the
paper recommends, each is smoothed with an exponential moving average (bias-corrected) and
B_simple is the ratio of the two averages, never an average of ratios.

Only parameters of the layers `ExampleNormHooks` covers enter both norms, so B_simple is that of
the covered parameters; `unsupported` names the rest (with a warning) and `coverage` is the
covered fraction of trainable parameters. For 100% of the parameters at no extra cost in a loop
with gradient accumulation or DDP, use `batchlab.measure.noise_micro.MicroBatchNoiseScale`.

Finiteness: a batch whose norms are not finite (an fp16 overflow that GradScaler then skips, a
diverging step) is recorded with `skipped=True` and leaves the averages as they were; one
inf would otherwise stay in the EMA for good. AMP: with `scaler=` (a `torch.amp.GradScaler`)
both norms are divided by the scale squared, so batches measured under different scales
average in the same units.
"""

from __future__ import annotations

import math
import warnings
from collections import deque
from dataclasses import asdict, dataclass
from typing import Any, Literal

import torch
from torch import nn

from batchlab.errors import BatchlabError
from batchlab.measure.grad_norms import ExampleNormHooks, opacus_rules


def mccandlish_estimates(g_small_sq: float, g_big_sq: float, b_small: float, b_big: float
                         ) -> tuple[float, float]:
    """(|G|^2, tr(Sigma)) from mean squared gradient norms at two batch sizes (McCandlish et al.,
    app. A): unbiased because E|G_B|^2 = |G|^2 + tr(Sigma)/B."""
    grad_sq = (b_big * g_big_sq - b_small * g_small_sq) / (b_big - b_small)
    trace_sigma = (g_small_sq - g_big_sq) / (1.0 / b_small - 1.0 / b_big)
    return grad_sq, trace_sigma


def noise_ratio(trace_sigma: float, grad_sq: float) -> float:
    """tr(Sigma)/|G|^2; +inf when the estimated |G|^2 <= 0 ("noise dominates"), nan when there
    is neither signal nor noise (e.g. all gradients zero)."""
    if grad_sq > 0:
        return trace_sigma / grad_sq
    return math.inf if trace_sigma > 0 else math.nan


@dataclass(frozen=True)
class GNSRecord:
    """One measured step: the raw estimates of that batch and the smoothed ones after it."""

    step: int  # counts gns.step() calls, from 0
    batch_size: int
    g_small_sq: float  # mean |g_i|^2 (per-example gradient, covered parameters)
    g_big_sq: float  # |mean g_i|^2 (the batch gradient)
    grad_sq: float  # raw unbiased |G|^2 of this batch (nan when B = 1)
    trace_sigma: float  # raw unbiased tr(Sigma)
    b_simple_raw: float  # trace_sigma / grad_sq of this batch alone
    grad_sq_smooth: float  # EMA of grad_sq (bias-corrected)
    trace_sigma_smooth: float
    b_simple: float  # trace_sigma_smooth / grad_sq_smooth
    skipped: bool = False  # non-finite norms: left out of the averages

    def to_json(self) -> dict:
        return {k: (v if not isinstance(v, float) or math.isfinite(v) else None)
                for k, v in asdict(self).items()}


def sum_sq_norms(tensors: list[torch.Tensor]) -> torch.Tensor:
    """sum_k |t_k|^2 as a float64 0-d tensor, without a host sync: one pass over each tensor in
    its own dtype (a float64 copy would cost more than the per-example hooks), fused into one
    multi-tensor kernel where torch has it (`_foreach_norm` on a GPU); fp16/bf16 tensors are
    reduced in float32 so that a large (loss-scaled) norm cannot overflow."""
    if any(t.dtype in (torch.float16, torch.bfloat16) for t in tensors):
        norms = [torch.linalg.vector_norm(t, dtype=torch.float32) for t in tensors]
    else:
        norms = list(torch._foreach_norm(tensors))
    return torch.linalg.vector_norm(torch.stack(norms), dtype=torch.float64).square()


def loss_scale(scaler: Any) -> torch.Tensor | None:
    """The scaler's current loss scale as a tensor (no host sync), None without scaling."""
    if scaler is None or not getattr(scaler, "is_enabled", lambda: True)():
        return None
    t = getattr(scaler, "_scale", None)
    if isinstance(t, torch.Tensor):
        return t.detach().clone()
    return torch.tensor(float(scaler.get_scale()), dtype=torch.float64)


def grads_unscaled(scaler: Any) -> bool:
    """Whether `scaler.unscale_(optimizer)` already ran this step (the `.grad` is in the
    loss's units): read off GradScaler's per-optimizer state."""
    states = getattr(scaler, "_per_optimizer_states", None) or {}
    return any(getattr(st.get("stage"), "name", "") == "UNSCALED" for st in states.values())


class SmoothedNoiseScale:
    """The results both estimators share (`GradientNoiseScale`, `MicroBatchNoiseScale`): the
    bias-corrected EMAs of |G|^2 and tr(Sigma), their ratio, and the per-step history. A
    subclass keeps `beta`, `_n_ema`, `_ema_g`, `_ema_s`, `_history` and a `_flush()` that
    folds pending measurements in (the host sync happens only when a result is read)."""

    beta: float
    _n_ema: int
    _ema_g: float
    _ema_s: float
    _history: Any

    def _flush(self) -> None:
        raise NotImplementedError

    def _smoothed(self) -> tuple[float, float]:
        if self._n_ema == 0:
            return math.nan, math.nan
        corr = 1.0 - self.beta**self._n_ema
        return self._ema_g / corr, self._ema_s / corr

    @property
    def b_simple(self) -> float:
        """Smoothed B_simple = trace_sigma / grad_sq (nan before the first measured step)."""
        self._flush()
        gs, ss = self._smoothed()
        return noise_ratio(ss, gs) if self._n_ema else math.nan

    @property
    def grad_sq(self) -> float:
        """Smoothed unbiased estimate of |G|^2 (the squared norm of the true gradient)."""
        self._flush()
        return self._smoothed()[0]

    @property
    def trace_sigma(self) -> float:
        """Smoothed unbiased estimate of tr(Sigma) (the per-example gradient variance)."""
        self._flush()
        return self._smoothed()[1]

    @property
    def history(self) -> list[GNSRecord]:
        """One record per measured step: raw and smoothed estimates (for micro-batches,
        `batch_size` is B_big)."""
        self._flush()
        return list(self._history)


class GradientNoiseScale(SmoothedNoiseScale):
    """Measures B_simple from the batches of a training loop: call `step()` after each backward.

    Args:
        model: the network being trained (hooks are attached to its Linear, Conv1d, Conv2d,
            LayerNorm, Embedding and Hugging Face Conv1D layers).
        reduction: how the loss combines the examples of a batch: "mean" (the default of every
            torch loss) or "sum". Getting it wrong scales B_simple by B^2.
        beta: EMA factor of the smoothed estimates (0.99 averages over ~100 steps).
        every: measure every `every`-th step only (hooks stay idle in between).
        max_history: keep at most this many records (None: all).
        backend: "hooks" (batchlab's own rules: Linear, Conv1d, Conv2d, LayerNorm, Embedding,
            HF Conv1D) or "opacus" (the same, plus Opacus's per-sample rules for the layers
            batchlab has none for: GroupNorm, InstanceNorm, RMSNorm, Conv3d, ...; needs
            `pip install opacus`).
    Per-example gradients of BatchNorm layers are not defined (the examples share batch
    statistics); such layers, and all others without a per-example rule, are listed in
    `unsupported` and left out of both norms. Every backward pass through the model between two
    `step()` calls is seen by the hooks (a gradient penalty's `autograd.grad` too), so there must
    be exactly one. With AMP loss scaling pass `scaler`: call `step()` before or after
    `scaler.unscale_(optimizer)` (which one is read off the scaler's state), and both norms are
    taken back to the loss's units."""

    def __init__(self, model: nn.Module, *, reduction: Literal["mean", "sum"] = "mean",
                 beta: float = 0.99, every: int = 1, max_history: int | None = None,
                 backend: Literal["hooks", "opacus"] = "hooks", scaler: Any = None) -> None:
        if reduction not in ("mean", "sum"):
            raise BatchlabError(f"reduction must be 'mean' or 'sum', not {reduction!r}")
        if not 0.0 <= beta < 1.0:
            raise BatchlabError(f"beta must be in [0, 1), not {beta}")
        if not (isinstance(every, int) and every >= 1):
            raise BatchlabError(f"every must be a positive integer, not {every!r}")
        if backend not in ("hooks", "opacus"):
            raise BatchlabError(f"backend must be 'hooks' or 'opacus', not {backend!r}")
        from torch.nn.parallel import DistributedDataParallel

        if isinstance(model, DistributedDataParallel):
            raise BatchlabError("GradientNoiseScale under DDP would pair one rank's per-example "
                                "gradients with the all-reduced .grad of every rank's examples "
                                "(biased): use batchlab.MicroBatchNoiseScale")
        self.model, self.reduction, self.beta, self.every = model, reduction, beta, every
        self.scaler = scaler
        self._hooks = ExampleNormHooks(model, opacus_rules() if backend == "opacus" else None)
        total = sum(p.numel() for p in model.parameters() if p.requires_grad)
        if total == 0:
            raise BatchlabError("the model has no trainable parameters")
        self._total = total
        self._t = 0
        self._pending: list[tuple[int, int, torch.Tensor]] = []
        self._history: deque[GNSRecord] = deque(maxlen=max_history)
        self._ema_g = self._ema_s = 0.0
        self._n_ema = 0
        self.last_sq_norms: torch.Tensor | None = None
        """|g_i|^2 of the last measured batch (per-example gradients of the per-example loss)."""
        if not self._hooks.layers:
            raise BatchlabError(f"no layer with a per-example rule in the model (backend {backend!r}); "
                                f"unsupported: {self._describe()}")
        if self._hooks.unsupported:
            self._warn(f"GradientNoiseScale leaves out the parameters of {self._describe()}; "
                       f"B_simple covers {self.coverage:.1%} of the trainable parameters")

    # -- what is measured --------------------------------------------------------------------
    @property
    def unsupported(self) -> dict[str, str]:
        """Module name -> why its parameters are not in the estimate."""
        return dict(self._hooks.unsupported)

    @property
    def covered(self) -> list[str]:
        """Names of the modules whose parameters the estimate is of."""
        return list(self._hooks.layers)

    @property
    def coverage(self) -> float:
        """Fraction of trainable parameters (by count) that the estimate covers."""
        return sum(p.numel() for p in self._hooks.params()) / self._total

    def _describe(self) -> str:
        return ", ".join(f"{n} [{why}]" for n, why in self._hooks.unsupported.items())

    @staticmethod
    def _warn(msg: str) -> None:
        warnings.warn(msg, RuntimeWarning, stacklevel=3)

    # -- the step ----------------------------------------------------------------------------
    def step(self) -> None:
        """Record the batch whose backward just ran (before `optimizer.zero_grad()`).

        Nothing is copied to the host here (no device sync); the numbers are computed when
        `b_simple`, `history` or the other estimates are read."""
        t = self._t
        self._t += 1
        self._hooks.active = self._t % self.every == 0  # whether the next step is measured
        if t % self.every:
            self._hooks.take()
            return
        sums, calls = self._hooks.take()
        if not sums:
            raise BatchlabError("gns.step() found no backward pass since the last step: call it after "
                                "loss.backward(), once per batch")
        if all(c > 1 for c in calls.values()):
            raise BatchlabError(f"gns.step() saw {min(calls.values())} backward passes since the last step: "
                                "call it after each loss.backward() (with gradient accumulation use "
                                "batchlab.MicroBatchNoiseScale)")
        for name, c in calls.items():
            if c > 1:
                self._hooks.drop(name, f"called {c} times in one forward (cross terms between the calls "
                                       "are not computed)")
                del sums[name]
                self._warn(f"GradientNoiseScale leaves out {name}: {self._hooks.unsupported[name]}")
        sizes = {n: s.shape[0] for n, s in sums.items()}
        if 1 in sizes.values() and len(set(sizes.values()) - {1}) == 1:
            # an input that broadcasts over the batch (GPT-2's position ids [1, T]): its
            # gradient arrives summed over the examples
            for name in [n for n, b in sizes.items() if b == 1]:
                self._hooks.drop(name, "its input broadcasts over the batch (batch dimension 1):"
                                       " the per-example gradients arrive summed")
                del sums[name], sizes[name]
                self._warn(f"GradientNoiseScale leaves out {name}: {self._hooks.unsupported[name]}")
        if len(set(sizes.values())) > 1:
            raise BatchlabError(f"layers see different batch sizes {sizes}: the first dimension of every "
                                "layer input must be the batch (flattening [B, T, d] to [B*T, d] is not)")
        self._check_unhooked(set(sums))
        b = next(iter(sizes.values()))
        # the layers' [B] norms summed in float64 (one stack and one reduction)
        sq = torch.stack(list(sums.values())).sum(0, dtype=torch.float64)
        grads = [p.grad for p in self._hooks.params(list(sums))]
        if any(g is None for g in grads):
            raise BatchlabError("a hooked layer has no .grad: call gns.step() after loss.backward() "
                                "and before optimizer.zero_grad()")
        big = sum_sq_norms([g.detach() for g in grads])
        if self.reduction == "mean":
            sq = sq * (b * b)  # the loss was (1/B) sum_i l_i: per-example gradients are B x the hooked ones
        else:
            big = big / (b * b)  # the loss was sum_i l_i: the mean gradient is .grad / B
        scale = loss_scale(self.scaler)
        if scale is not None:  # the hooks saw the scaled loss's gradients; .grad maybe not
            inv2 = scale.to(sq.device, torch.float64).reciprocal().pow(2)
            sq = sq * inv2
            if not grads_unscaled(self.scaler):
                big = big * inv2
        self.last_sq_norms = sq
        self._pending.append((t, b, torch.stack([sq.mean(), big])))

    def _check_unhooked(self, fired: set[str]) -> None:
        """A covered layer whose hooks did not run but whose parameters got a gradient is used
        functionally (e.g. the out_proj of nn.MultiheadAttention): report it, never skip it."""
        for name in [n for n in self._hooks.layers if n not in fired]:
            grads = [p.grad for p in self._hooks.params([name]) if p.grad is not None]
            if any(bool(g.ne(0).any()) for g in grads):
                self._hooks.drop(name, "has gradients but its forward was not called (used functionally)")
                self._warn(f"GradientNoiseScale leaves out {name}: {self._hooks.unsupported[name]}")

    def _flush(self) -> None:
        if not self._pending:
            return
        values = torch.stack([v for _, _, v in self._pending]).cpu().tolist()
        for (t, b, _), (small, big) in zip(self._pending, values):
            if not (math.isfinite(small) and math.isfinite(big)):  # the guard: EMA untouched
                gs, ss = self._smoothed()
                self._history.append(GNSRecord(step=t, batch_size=b, g_small_sq=small,
                                               g_big_sq=big, grad_sq=math.nan,
                                               trace_sigma=math.nan, b_simple_raw=math.nan,
                                               grad_sq_smooth=gs, trace_sigma_smooth=ss,
                                               b_simple=noise_ratio(ss, gs), skipped=True))
                continue
            if b > 1:
                g2, tr = mccandlish_estimates(small, big, 1, b)
                self._ema_g = self.beta * self._ema_g + (1 - self.beta) * g2
                self._ema_s = self.beta * self._ema_s + (1 - self.beta) * tr
                self._n_ema += 1
            else:  # one example: no second batch size, nothing to estimate
                g2 = tr = math.nan
            gs, ss = self._smoothed()
            self._history.append(GNSRecord(step=t, batch_size=b, g_small_sq=small, g_big_sq=big,
                                           grad_sq=g2, trace_sigma=tr, b_simple_raw=noise_ratio(tr, g2),
                                           grad_sq_smooth=gs, trace_sigma_smooth=ss,
                                           b_simple=noise_ratio(ss, gs)))
        self._pending = []


    def state_dict(self) -> dict[str, float | int]:
        """The averages and the step count (not the history): what a resumed run needs to go
        on averaging instead of starting the EMA over."""
        self._flush()
        return {"t": self._t, "ema_g": self._ema_g, "ema_s": self._ema_s, "n_ema": self._n_ema}

    def load_state_dict(self, state: dict[str, float | int]) -> None:
        self._flush()
        self._t, self._ema_g = int(state["t"]), float(state["ema_g"])
        self._ema_s, self._n_ema = float(state["ema_s"]), int(state["n_ema"])
        self._hooks.active = self._t % self.every == 0

    def reset(self) -> None:
        """Forget the averages and history (e.g. after a learning-rate change)."""
        self._flush()
        self._history.clear()
        self._ema_g = self._ema_s = 0.0
        self._n_ema = 0

    def close(self) -> None:
        """Remove the hooks from the model."""
        self._hooks.remove()

    def __enter__(self) -> GradientNoiseScale:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
