"""The gradient-competition trial engine: checkpoints, trials, modes and on-disk tensors.

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
  so a step is a mean-loss step at learning rate lr x B_s, recorded x B_s (the fused engine's
  mean reduction is reused; `fused.py` is not changed). At b=1 this is bit-for-bit the
  mean-loss trajectory, so b=1 is computed once and shared. Large b means a learning rate of
  lr x b (10.24 at b=1024) and the steps can blow up: a trial is flagged `blowup` when its
  summed gradient is non-finite or any step's mean loss is non-finite or exceeds
  `blowup_loss` nats (default 100, against ln 10 = 2.3 for a uniform guess). Blown-up trials
  are recorded (tensor rows included, NaN or not) and excluded from the statistics.

**Speed** (choose per device, measured by benchmarks/gradient_competition.py): on the CPU
the `deferred` engine (`batchlab.engine.deferred`) runs a pass with the weight updates deferred and
applied as one rank-32 product per chunk of rows, which turns the small-batch steps from
update-bound into two matrix-vector-like products each; trials run on parallel workers, one per
CPU thread, each single-threaded (a trial's numbers therefore do not depend on how many
workers there are). On a GPU the `fused` engine (`FusedMLPSGD`) steps K stacked trials at once
with batched matmuls. Both add delta^T h of the last layer into an accumulator.

**Seeds**: trial t of a run has seed `trial_seeds(seed, stream)[t]` (recorded); its samples are
`randperm(n_train, Generator(seed))[:n]`. With `same_samples`, the sample set comes from a
separate `sample_seed` and the trial seed only shuffles the order within the set.

**Storage**: per (mode, b) a `.npy` file [trials, 10240] float32 written incrementally through
`np.lib.format.open_memmap` under a temporary name and renamed when complete, plus a JSON
record with the per-trial norms, flags and streaming statistics (moments, histogram), so the
statistics never need the tensors in memory and `keep_tensors=False` writes none at all.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from batchlab.atomic import atomic_write
from batchlab.engine.deferred import Step, sgd_pass
from batchlab.engine.fused import FusedMLPSGD
from batchlab.errors import BatchlabError, ConfigError

BATCH_SIZES = (1, 2, 3, 4, 5, 6, 7, 8, 16, 32, 64, 128, 256, 512, 1024)
MODES = ("displacement", "sample-sum", "sum-loss")
HIST_RANGE = 12.0  # histogram edges: +-12 x the key's scale
HIST_BINS = 96
TAIL_K = 4.0  # "beyond threshold" = |value| > 4 x the key's scale
ENGINES = ("deferred", "fused")
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


def default_engine(device: torch.device) -> str:
    """`deferred` on the CPU (benchmarks/gradient_competition.py, one thread, per trial:
    1.2-2.6x faster than `fused` at b <= 8, equal at b = 16-128, up to 2x at b >= 256 where
    the final step records its gradient without the backward); `fused` on a GPU, where a step
    is bound by kernel launches and K stacked trials fill the device (the deferred engine
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
    model.load_state_dict(state)
    return model


def _linears(model: nn.Module) -> list[nn.Linear]:
    lins = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not lins:
        raise BatchlabError("the gradient-competition engine needs an MLP of Linear layers")
    return lins


# -- one block of K trials at one batch size ------------------------------------------------
def run_block(model: nn.Module, x: torch.Tensor, y: torch.Tensor, b: int, lr: float, *,
              sum_loss: bool = False, engine: str | None = None) -> dict[str, torch.Tensor]:
    """Step K stacked copies of `model` through x [K, n, D], y [K, n] at batch size b.

    Returns last-layer summed gradients flattened to [K, out*in]: `displacement` and
    `sample-sum` (mean-loss trajectory) or `sum-loss` (sum-loss trajectory), plus `max_loss`
    [K], the largest per-step mean loss (NaN if any was NaN). `model` is not modified.
    """
    engine = engine or default_engine(x.device)
    if engine not in ENGINES:
        raise ConfigError(f"unknown engine {engine!r}; choose from {', '.join(ENGINES)}")
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
    if engine == "deferred":
        max_loss = sgd_pass(W, bias, x, y, steps, rank=DEFERRED_RANK, final_update=False)
    else:
        eng = FusedMLPSGD(W, bias)
        max_loss = torch.full((K,), -math.inf, dtype=W[0].dtype, device=W[0].device)
        for st in steps:
            loss = eng.step(x[:, st.start:st.stop], y[:, st.start:st.stop], st.lr,
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
                    modes: Sequence[str], engine: str | None = None) -> dict[str, torch.Tensor]:
    """All requested modes for K trials at batch size b; sum-loss at b=1 reuses the mean-loss
    trajectory (identical by construction: lr x 1, record x 1)."""
    out: dict[str, torch.Tensor] = {}
    need_mean = b == 1 or any(m in modes for m in ("displacement", "sample-sum"))
    if need_mean:
        res = run_block(model, x, y, b, lr, engine=engine)
        out.update({m: res[m] for m in ("displacement", "sample-sum") if m in modes})
        out["max_loss/mean"] = res["max_loss"]
        if b == 1 and "sum-loss" in modes:
            out["sum-loss"] = res["displacement"]
            out["max_loss/sum"] = res["max_loss"]
    if "sum-loss" in modes and b > 1:
        res = run_block(model, x, y, b, lr, sum_loss=True, engine=engine)
        out["sum-loss"] = res["sum-loss"]
        out["max_loss/sum"] = res["max_loss"]
    return out


def replay_trial(model: nn.Module, X: torch.Tensor, Y: torch.Tensor, seed: int, b: int,
                 lr: float, mode: str, n_samples: int = 1024,
                 sample_seed: int | None = None, engine: str | None = None) -> torch.Tensor:
    """Recompute one trial's summed gradient [out*in] from its recorded seed(s). On the CPU
    every trial runs single-threaded, so this is bit-identical to the stored row (on a GPU:
    when run with the K that wrote it)."""
    idx = sample_indices(len(Y), n_samples, seed, sample_seed).to(X.device)
    with _threads(1 if X.device.type == "cpu" else torch.get_num_threads()):
        res = run_trial_block(model, X[idx].unsqueeze(0), Y[idx].unsqueeze(0), b, lr, [mode],
                              engine)
    return res[mode][0]


# -- streaming statistics of the raw values ------------------------------------------------
@dataclass
class ValueStats:
    """Moments and a histogram of every recorded gradient value of one (mode, b), updated
    chunk by chunk. The histogram's scale is the RMS of the first chunk (deterministic), so
    the edges are fixed before the data is seen in full and shapes compare across b."""

    scale: float = 0.0
    count: int = 0
    nonfinite: int = 0
    sums: list[float] = field(default_factory=lambda: [0.0, 0.0, 0.0, 0.0])
    hist: list[int] = field(default_factory=lambda: [0] * HIST_BINS)
    outside: int = 0
    tail: int = 0

    def update(self, values: np.ndarray) -> None:
        v = values.astype(np.float64).ravel()
        ok = np.isfinite(v)
        self.nonfinite += int((~ok).sum())
        v = v[ok]
        if v.size == 0:
            return
        if self.scale <= 0.0:
            rms = float(np.sqrt(np.mean(v * v)))
            self.scale = rms if rms > 0 else 1.0
        self.count += int(v.size)
        p = v.copy()
        for i in range(4):
            self.sums[i] += float(p.sum())
            p *= v
        u = v / self.scale
        h, _ = np.histogram(u, bins=HIST_BINS, range=(-HIST_RANGE, HIST_RANGE))
        self.hist = [a + int(c) for a, c in zip(self.hist, h)]
        self.outside += int((np.abs(u) > HIST_RANGE).sum())
        self.tail += int((np.abs(u) > TAIL_K).sum())

    def summary(self) -> dict[str, float]:
        n = self.count
        if n == 0:
            return {"value_rms": math.nan, "kurtosis": math.nan, "tail_fraction": math.nan}
        m1, m2, m3, m4 = (s / n for s in self.sums)
        var = m2 - m1 * m1
        c4 = m4 - 4 * m1 * m3 + 6 * m1 * m1 * m2 - 3 * m1**4
        kurt = c4 / var**2 - 3.0 if var > 0 else math.nan
        return {"value_rms": math.sqrt(m2), "kurtosis": kurt, "tail_fraction": self.tail / n}

    def to_json(self) -> dict[str, Any]:
        return {"scale": self.scale, "count": self.count, "nonfinite": self.nonfinite,
                "sums": self.sums, "hist": self.hist, "outside": self.outside, "tail": self.tail}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> ValueStats:
        return cls(**d)


# -- on-disk tensors ----------------------------------------------------------------------
class TensorFile:
    """A [trials, width] float32 .npy written row-block by row-block through a memmap under a
    temporary name; `close()` flushes and renames it into place (atomic: a crash never leaves
    a file that looks complete)."""

    def __init__(self, path: Path, trials: int, width: int) -> None:
        self.path = path
        self.tmp = path.with_name(f".{path.stem}.partial.npy")
        path.parent.mkdir(parents=True, exist_ok=True)
        self.mm = np.lib.format.open_memmap(self.tmp, mode="w+", dtype=np.float32,
                                            shape=(trials, width))

    def write(self, start: int, rows: np.ndarray) -> None:
        self.mm[start:start + len(rows)] = rows

    def close(self) -> None:
        self.mm.flush()
        del self.mm
        os.replace(self.tmp, self.path)

    def discard(self) -> None:
        """Drop the unfinished file (the run failed or was interrupted)."""
        del self.mm
        self.tmp.unlink(missing_ok=True)


def open_tensors(path: Path, trials: int | None = None, width: int | None = None) -> np.ndarray:
    """Memory-map a kept tensor file read-only; a missing, truncated or mis-shaped file is a
    one-line BatchlabError."""
    path = Path(path)
    if not path.is_file():
        raise BatchlabError(f"tensor file {path} is missing; delete its directory to recompute")
    try:
        arr = np.load(path, mmap_mode="r")
    except (ValueError, OSError, EOFError) as e:
        raise BatchlabError(f"tensor file {path} is truncated or corrupt ({e}); delete its "
                            f"directory to recompute") from None
    want = (trials, width)
    if arr.ndim != 2 or any(w is not None and a != w for a, w in zip(arr.shape, want)):
        raise BatchlabError(f"tensor file {path} has shape {arr.shape}, expected {want}")
    return arr


def _atomic_json(path: Path, obj: Any) -> None:
    atomic_write(path, json.dumps(obj))


# -- a whole run: trials x batch sizes for one checkpoint ----------------------------------
@dataclass
class TrialRun:
    """The design of one set of trials on one checkpoint. `sample_seeds[t]` is None for
    fresh-sample trials, else the seed of trial t's fixed sample set."""

    name: str
    seeds: list[int]
    sample_seeds: list[int | None]
    batch_sizes: list[int]
    modes: list[str]
    n_samples: int = 1024
    lr: float = 0.01
    blowup_loss: float = 100.0
    k: int | None = None
    threads: int | None = None  # CPU: parallel single-threaded workers (default: torch's)
    engine: str | None = None  # None: `default_engine(device)`

    def spec_hash(self, checkpoint_id: str, device: torch.device) -> str:
        """Everything that changes the numbers (not `threads`: on the CPU a trial's numbers
        do not depend on the number of workers)."""
        engine = self.engine or default_engine(device)
        d = {"ckpt": checkpoint_id, "seeds": self.seeds, "sample_seeds": self.sample_seeds,
             "modes": self.modes, "n": self.n_samples, "lr": self.lr, "k": self.k,
             "blowup": self.blowup_loss, "engine": engine,
             **({"rank": DEFERRED_RANK} if engine == "deferred" else {})}
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:12]


def run_trials(run: TrialRun, model: nn.Module, X: torch.Tensor, Y: torch.Tensor,
               directory: Path, checkpoint_id: str, *, keep_tensors: bool = True,
               progress: Callable[[str], None] | None = None,
               advance: Callable[[int, int], None] | None = None) -> dict[int, dict[str, Any]]:
    """Run (or reuse) every batch size of `run`; returns {b: record}. A record holds, per mode,
    the per-trial norms and blow-up flags, the value statistics and the tensor file name.
    `progress(line)` is called when a batch size completes, `advance(b, trials)` as trials
    complete (for a progress bar; a reused batch size reports all its trials at once).

    Results live in `directory/<name>-<spec hash>/`: one JSON record per b (written last, so a
    record means the b is complete) and, with `keep_tensors`, one .npy per (mode, b). Rerunning
    the same design reuses complete batch sizes and verifies their tensor files.
    """
    validate_batch_sizes(run.batch_sizes, run.n_samples)
    unknown = [m for m in run.modes if m not in MODES]
    if unknown:
        raise ConfigError(f"unknown modes {unknown}; choose from {', '.join(MODES)}")
    if run.engine is not None and run.engine not in ENGINES:
        raise ConfigError(f"unknown engine {run.engine!r}; choose from {', '.join(ENGINES)}")
    d = Path(directory) / f"{run.name}-{run.spec_hash(checkpoint_id, X.device)}"
    d.mkdir(parents=True, exist_ok=True)
    width = _linears(model)[-1].weight.numel()
    idx = torch.stack([sample_indices(len(Y), run.n_samples, s, ss)
                       for s, ss in zip(run.seeds, run.sample_seeds)]).to(X.device)
    out: dict[int, dict[str, Any]] = {}
    for b in run.batch_sizes:
        out[b] = _reuse_or_run(run, model, X, Y, idx, b, d, width, keep_tensors, progress,
                               advance)
    return out


@contextmanager
def _threads(n: int) -> Iterator[None]:
    """Run with n intra-op threads (this thread's OpenMP setting and torch's), then restore."""
    old = torch.get_num_threads()
    torch.set_num_threads(max(1, n))
    try:
        yield
    finally:
        torch.set_num_threads(old)


def _blocks(fn: Callable[[int], dict[str, torch.Tensor]], starts: Sequence[int],
            device: torch.device, workers: int | None) -> Iterator[dict[str, torch.Tensor]]:
    """fn(start) for every block start, in order. On the CPU the blocks run on `workers`
    threads, each with ONE intra-op thread (torch releases the GIL inside kernels), so a
    block's numbers are the same whatever the worker count."""
    n = workers or default_workers(device)
    if device.type != "cpu":
        yield from map(fn, starts)
        return

    def single(start: int) -> dict[str, torch.Tensor]:
        torch.set_num_threads(1)  # OpenMP's thread count is per calling thread
        return fn(start)

    with _threads(1):
        if n <= 1 or len(starts) <= 1:
            yield from map(single, starts)
            return
        with ThreadPoolExecutor(max_workers=n) as pool:
            ahead: deque[Future] = deque()  # a bounded window: results are consumed in order
            for start in starts:
                ahead.append(pool.submit(single, start))
                if len(ahead) >= 2 * n:
                    yield ahead.popleft().result()
            while ahead:
                yield ahead.popleft().result()


def _reuse_or_run(run: TrialRun, model: nn.Module, X: torch.Tensor, Y: torch.Tensor,
                  idx: torch.Tensor, b: int, d: Path, width: int, keep_tensors: bool,
                  progress: Callable[[str], None] | None,
                  advance: Callable[[int, int], None] | None) -> dict[str, Any]:
    T = len(run.seeds)
    rec_path = d / f"b{b:04d}.json"
    if rec_path.is_file():
        rec = json.loads(rec_path.read_text())
        if rec.get("keep_tensors"):
            for m in run.modes:
                open_tensors(d / rec["modes"][m]["file"], T, width)
        if advance:
            advance(b, T)
        return rec
    rec = _run_batch_size(run, model, X, Y, idx, b, d, width, keep_tensors, advance)
    _atomic_json(rec_path, rec)
    if progress:
        progress(f"{run.name} b={b}: {rec['seconds']:.1f}s ({T} trials)")
    return rec


def _run_batch_size(run: TrialRun, model: nn.Module, X: torch.Tensor, Y: torch.Tensor,
                    idx: torch.Tensor, b: int, d: Path, width: int, keep_tensors: bool,
                    advance: Callable[[int, int], None] | None = None) -> dict[str, Any]:
    T = len(run.seeds)
    K = run.k or default_k(b, X.device)
    files = {m: TensorFile(d / f"{m}_b{b:04d}.npy", T, width) for m in run.modes} \
        if keep_tensors else {}
    stats = {m: ValueStats() for m in run.modes}
    norms = {m: np.zeros(T) for m in run.modes}
    max_loss = {m: np.zeros(T) for m in run.modes}
    t0 = time.perf_counter()

    def block(start: int) -> dict[str, torch.Tensor]:
        ids = idx[start:start + K]
        return run_trial_block(model, X[ids], Y[ids], b, run.lr, run.modes, run.engine)

    starts = list(range(0, T, K))
    try:
        for start, res in zip(starts, _blocks(block, starts, X.device, run.threads)):
            for m in run.modes:
                g = res[m].to(torch.float32).cpu().numpy()
                nrm = np.linalg.norm(g.astype(np.float64), axis=1)
                ml = res["max_loss/sum" if m == "sum-loss" else "max_loss/mean"].cpu().numpy()
                norms[m][start:start + len(g)] = nrm
                max_loss[m][start:start + len(g)] = ml
                stats[m].update(g[~_blown(nrm, ml, run.blowup_loss)])
                if keep_tensors:
                    files[m].write(start, g)
            if advance:
                advance(b, len(res[run.modes[0]]))
    except BaseException:  # interrupted or failed: leave no partial tensor files behind
        for f in files.values():
            f.discard()
        raise
    seconds = time.perf_counter() - t0
    for f in files.values():
        f.close()
    rec: dict[str, Any] = {"b": b, "k": K, "seconds": seconds, "trials": T,
                           "engine": run.engine or default_engine(X.device),
                           "keep_tensors": keep_tensors, "modes": {}}
    for m in run.modes:
        ml = max_loss[m]
        blow = _blown(norms[m], ml, run.blowup_loss)
        rec["modes"][m] = {
            "file": f"{m}_b{b:04d}.npy" if keep_tensors else None,
            "norms": [float(v) if math.isfinite(v) else None for v in norms[m]],
            "max_loss": [float(v) if math.isfinite(v) else None for v in ml],
            "blowup": [bool(v) for v in blow],
            "values": stats[m].to_json(),
        }
    return rec


def _blown(norms: np.ndarray, max_loss: np.ndarray, limit: float) -> np.ndarray:
    """Blow-up flags: non-finite summed gradient, or a step loss non-finite or above `limit`."""
    with np.errstate(invalid="ignore"):
        return ~np.isfinite(norms) | ~np.isfinite(max_loss) | (max_loss > limit)


def norms_array(rec: dict[str, Any], mode: str, finite_only: bool = True) -> np.ndarray:
    """Per-trial norms of one (b, mode) record; blown-up trials dropped if `finite_only`."""
    m = rec["modes"][mode]
    v = np.array([np.nan if x is None else x for x in m["norms"]], dtype=float)
    if finite_only:
        v = v[~np.asarray(m["blowup"], dtype=bool)]
    return v
