"""Gradient-competition trials: checkpoints, trials, modes and on-disk tensors.

One **trial** resets the MLP to a checkpoint, draws `n_samples` (1024) training samples from
the trial's own seed and, for every batch size b, starting again from the checkpoint, steps
through those samples once in ceil(n/b) plain-SGD steps while summing the last layer's weight
gradient (10 x 1024 = 10,240 values). Every batch size sees the samples in the same drawn order.

**Remainder rule**: when b does not divide n, the first floor(n/b) steps use b samples and one
last, smaller step uses the remaining r = n mod b samples (e.g. b=3: 341 steps of 3 + 1 step
of 1), so every b sees each of the n samples exactly once.

**Modes** (what is summed; g_s = gradient of the *mean* loss of step s, B_s its batch size):
- `displacement`: loss mean-reduced; record sum_s g_s. Since W_end - W_0 = -lr sum_s g_s for
  the last layer, this is the weight displacement / lr.
- `sample-sum`: the same steps as `displacement`; record sum_s B_s g_s, the sum of the
  per-sample gradients seen. Both come out of ONE trajectory: the full steps accumulate into
  one buffer F, the remainder step into R, and displacement = F + R, sample-sum = b F + r R.
- `sum-loss`: loss sum-reduced for stepping and recording. The sum-reduced gradient is B_s g_s,
  so a step is a mean-loss step at learning rate lr x B_s, recorded x B_s (the fused stepper's
  mean reduction is reused; `fused.py` is not changed). At b=1 this is bit-for-bit the
  mean-loss trajectory, so b=1 is computed once and shared. Large b means a learning rate of
  lr x b (10.24 at b=1024) and the steps can blow up: a trial is flagged `blowup` when its
  summed gradient is non-finite or any step's mean loss is non-finite or exceeds
  `blowup_loss` nats (default 100, against ln 10 = 2.3 for a uniform guess). Blown-up trials
  are recorded (tensor rows included, NaN or not) and excluded from the statistics.

**Speed** (choose per device, measured by benchmarks/gradient_competition.py): on the CPU
the `deferred` backend (`batchlab.engine.deferred`) runs a pass with the weight updates deferred and
applied as one rank-32 product per chunk of rows, which turns the small-batch steps from
update-bound into two matrix-vector-like products each; trials run on parallel workers, one per
CPU thread, each single-threaded (a trial's numbers therefore do not depend on how many
workers there are). On a GPU the `fused` backend (`FusedMLPSGD`) steps K stacked trials at once
with batched matmuls. Both add delta^T h of the last layer into an accumulator.

**Seeds**: trial t of a run has seed `trial_seeds(seed, stream)[t]` (recorded); its samples are
`randperm(n_train, Generator(seed))[:n]`. With `same_samples`, the sample set comes from a
separate `sample_seed` and the trial seed only shuffles the order within the set.

**Storage and execution**: trials run in chunks (`gradcomp_trials`), locally or as Ray tasks,
and every chunk's summary is a checksummed row of the results store (`gradcomp_runner`); kept
tensors are .npy files whose sha256 the store checks on every load.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from batchlab.engine.deferred import Step, sgd_pass
from batchlab.engine.fused import FusedMLPSGD
from batchlab.errors import BatchlabError, ConfigError
from batchlab.runs.tasks import threads

BATCH_SIZES = (1, 2, 3, 4, 5, 6, 7, 8, 16, 32, 64, 128, 256, 512, 1024)
MODES = ("displacement", "sample-sum", "sum-loss")
HIST_RANGE = 12.0  # histogram edges: +-12 x the key's scale
HIST_BINS = 96
TAIL_K = 4.0  # "beyond threshold" = |value| > 4 x the key's scale
BACKENDS = ("deferred", "fused")
"""The trial backends: the step kernel a trial runs on (`engine.deferred.sgd_pass` or
`engine.fused.FusedMLPSGD`). Called backends, not engines, inside the package: "engine" is the
training engine (`batchlab.engine`, TrainConfig.engine: autograd or fused), and the deferred pass
is not one. The user option keeps its name, `--set engine=`, and so do the chunk's stored key
and its record (`gradcomp_trials.ChunkTask.spec`), so stored rows keep their keys."""
DEFERRED_RANK = 32  # rows per deferred chunk: best of 16-256 at b = 1..64 (benchmark)


def validate_batch_sizes(batch_sizes: Sequence[int], n_samples: int) -> list[int]:
    """Sorted unique batch sizes, each in [1, n_samples] (one-line ConfigError otherwise)."""
    try:
        bs = sorted({int(b) for b in batch_sizes})
    except (TypeError, ValueError):
        raise ConfigError(f"batch sizes must be integers, got {batch_sizes!r}") from None
    if not bs:
        raise ConfigError("the batch-size list is empty")
    bad = [b for b in bs if b <= 0 or b > n_samples]
    if bad:
        raise ConfigError(f"batch sizes must be in 1..{n_samples} (the sample count); got {bad}")
    return bs


def default_backend(device: torch.device) -> str:
    """`deferred` on the CPU (benchmarks/gradient_competition.py, one thread, per trial:
    1.2-2.6x faster than `fused` at b <= 8, equal at b = 16-128, up to 2x at b >= 256 where
    the final step records its gradient without the backward); `fused` on a GPU, where a step
    is bound by kernel launches and K stacked trials fill the device (the deferred backend
    launches more kernels per step; not yet measured there)."""
    return "fused" if device.type == "cuda" else "deferred"


def default_k(b: int, device: torch.device) -> int:
    """Trials stepped together at batch size b. CPU: K=1 at every b; trials run in parallel
    on workers instead (`default_workers`): one model's weights (7.3 MB) stay in the
    last-level cache while K stacked copies do not, and at larger b a step is compute-bound so
    stacking adds nothing (benchmark: K=2, 4 no faster per trial). GPU: stacking fills the
    device (defaults not yet measured on one; override with the `k` option)."""
    if device.type == "cuda":
        return 64 if b <= 64 else 16
    return 1


def default_workers(device: torch.device) -> int:
    """Parallel trial workers: on the CPU one per torch thread, each running single-threaded
    (small-batch steps cannot use two cores: a 1024x1024 matrix-vector product is too short
    to split, while two trials at once run 1.3-2x faster than one after the other); on a GPU
    one."""
    return 1 if device.type == "cuda" else torch.get_num_threads()


def trial_seeds(seed: int, stream: str, n: int) -> list[int]:
    """n recorded trial seeds, a pure function of (seed, stream)."""
    tag = int.from_bytes(hashlib.sha256(stream.encode()).digest()[:4], "little")
    ss = np.random.SeedSequence([int(seed), tag])
    return [int(s) & ((1 << 62) - 1) for s in ss.generate_state(n, dtype=np.uint64)]


def sample_indices(n_train: int, n_samples: int, seed: int,
                   sample_seed: int | None = None) -> torch.Tensor:
    """The trial's samples in stepping order. Without `sample_seed`: the first n of a seeded
    permutation (set and order both from `seed`). With it: a fixed set from `sample_seed`,
    ordered by `seed`."""
    if n_samples > n_train:
        raise ConfigError(f"n_samples {n_samples} exceeds the training set ({n_train})")
    if sample_seed is None:
        return torch.randperm(n_train, generator=torch.Generator().manual_seed(seed))[:n_samples]
    chosen = torch.randperm(n_train, generator=torch.Generator().manual_seed(sample_seed))
    order = torch.randperm(n_samples, generator=torch.Generator().manual_seed(seed))
    return chosen[:n_samples][order]


def fit_state(model: nn.Module, state: dict[str, torch.Tensor], what: str = "checkpoint"
              ) -> nn.Module:
    """Load `state` into `model`, with a one-line error when it does not fit."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    extra = sorted(set(state) - set(own))
    bad = [k for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or extra or bad:
        parts = [f"missing {missing[:3]}" if missing else "",
                 f"unexpected {extra[:3]}" if extra else "",
                 f"shape mismatch {bad[:3]}" if bad else ""]
        raise BatchlabError(f"{what} does not fit the model: {'; '.join(p for p in parts if p)}")
    bad = [k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise BatchlabError(f"{what} has NaN or infinite weights ({', '.join(bad[:3])}); "
                            "refusing to measure gradients on it")
    model.load_state_dict(state)
    return model


def _linears(model: nn.Module) -> list[nn.Linear]:
    lins = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not lins:
        raise BatchlabError("gradient-competition trials need an MLP of Linear layers")
    return lins


# -- one block of K trials at one batch size ------------------------------------------------
def run_block(model: nn.Module, x: torch.Tensor, y: torch.Tensor, b: int, lr: float, *,
              sum_loss: bool = False, backend: str | None = None) -> dict[str, torch.Tensor]:
    """Step K stacked copies of `model` through x [K, n, D], y [K, n] at batch size b.

    Returns last-layer summed gradients flattened to [K, out*in]: `displacement` and
    `sample-sum` (mean-loss trajectory) or `sum-loss` (sum-loss trajectory), plus `max_loss`
    [K], the largest per-step mean loss (NaN if any was NaN). `model` is not modified.
    """
    backend = backend or default_backend(x.device)
    if backend not in BACKENDS:
        raise ConfigError(f"unknown trial backend {backend!r}; choose from {', '.join(BACKENDS)}")
    K, n = y.shape
    lins = _linears(model)
    last = len(lins) - 1
    W = [lin.weight.detach().unsqueeze(0).repeat(K, 1, 1) for lin in lins]
    bias = [lin.bias.detach().unsqueeze(0).repeat(K, 1) for lin in lins]
    full = torch.zeros_like(W[last])
    rem = torch.zeros_like(W[last])
    n_full, r = divmod(n, b)
    # sum-loss: gradient of the summed loss = B x mean-loss gradient -> lr x B, record x B
    steps = [Step(s * b, (s + 1) * b, lr * b if sum_loss else lr, full,
                  float(b) if sum_loss else 1.0) for s in range(n_full)]
    if r:
        steps.append(Step(n_full * b, n, lr * r if sum_loss else lr, rem,
                          float(r) if sum_loss else 1.0))
    if backend == "deferred":
        max_loss = sgd_pass(W, bias, x, y, steps, rank=DEFERRED_RANK, final_update=False)
    else:
        fused = FusedMLPSGD(W, bias)
        max_loss = torch.full((K,), -math.inf, dtype=W[0].dtype, device=W[0].device)
        for st in steps:
            loss = fused.step(x[:, st.start:st.stop], y[:, st.start:st.stop], st.lr,
                            grad_sink={last: st.sink}, grad_scale=st.scale)
            max_loss = torch.maximum(max_loss, loss)
    out = {"max_loss": max_loss}
    if sum_loss:
        out["sum-loss"] = (full + rem).reshape(K, -1)
    else:
        out["displacement"] = (full + rem).reshape(K, -1)
        out["sample-sum"] = (full * b + rem * r).reshape(K, -1)
    return out


def run_trial_block(model: nn.Module, x: torch.Tensor, y: torch.Tensor, b: int, lr: float,
                    modes: Sequence[str], backend: str | None = None) -> dict[str, torch.Tensor]:
    """All requested modes for K trials at batch size b; sum-loss at b=1 reuses the mean-loss
    trajectory (identical by construction: lr x 1, record x 1)."""
    out: dict[str, torch.Tensor] = {}
    need_mean = b == 1 or any(m in modes for m in ("displacement", "sample-sum"))
    if need_mean:
        res = run_block(model, x, y, b, lr, backend=backend)
        out.update({m: res[m] for m in ("displacement", "sample-sum") if m in modes})
        out["max_loss/mean"] = res["max_loss"]
        if b == 1 and "sum-loss" in modes:
            out["sum-loss"] = res["displacement"]
            out["max_loss/sum"] = res["max_loss"]
    if "sum-loss" in modes and b > 1:
        res = run_block(model, x, y, b, lr, sum_loss=True, backend=backend)
        out["sum-loss"] = res["sum-loss"]
        out["max_loss/sum"] = res["max_loss"]
    return out


def replay_trial(model: nn.Module, X: torch.Tensor, Y: torch.Tensor, seed: int, b: int,
                 lr: float, mode: str, n_samples: int = 1024,
                 sample_seed: int | None = None, backend: str | None = None) -> torch.Tensor:
    """Recompute one trial's summed gradient [out*in] from its recorded seed(s). On the CPU
    every trial runs single-threaded, so this is bit-identical to the stored row (on a GPU:
    when run with the K that wrote it)."""
    idx = sample_indices(len(Y), n_samples, seed, sample_seed).to(X.device)
    with threads(1 if X.device.type == "cpu" else torch.get_num_threads()):
        res = run_trial_block(model, X[idx].unsqueeze(0), Y[idx].unsqueeze(0), b, lr, [mode],
                              backend)
    return res[mode][0]
