"""Benchmark: one gradient-competition trial, naive loop vs batchlab.

Prints, in one run:
  1. seconds per trial per batch size: the naive loop (autograd + torch.optim.SGD, a fresh
     deepcopy of the model per batch size, a Python loop over steps - what the study would
     write, on torch's default threads) vs batchlab as the experiment runs it
     (`gradcomp_runner.run_trials`: the CPU's `deferred` backend, trials on parallel single-threaded
     workers), both computing the `displacement` mode (batchlab's one trajectory also yields
     `sample-sum`);
  2. the trial backends one trial at a time on one thread (`deferred` vs `fused`), per batch size:
     how `default_backend` was chosen, and what the parallel workers add;
  3. batchlab's per-step time at b=1 against the memory-bandwidth bound: bytes the step moves
     / measured DRAM copy bandwidth (best of 5 copies of 256 MB, far larger than the caches);
     the target pairs the experiment's pass (all cores) with the all-core bandwidth; also one
     stream (best of 3 passes, 1 thread) against 1-thread bandwidth, for the deferred step
     and for the textbook fused step;
  4. seconds per trial for K stacked trials at a few batch sizes (how `default_k` was chosen).
Targets on a 2-core CPU: >= 3x the naive loop over the whole trial, b=1 step within 1.5x of
the bandwidth bound. PASS/FAIL is computed from the measured numbers.

    python benchmarks/gradient_competition.py [--naive-trials 1] [--trials 4] [--naive-threads N]
"""

from __future__ import annotations

import argparse
import copy
import math
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from batchlab.analysis import gradcomp as gc
from batchlab.analysis.gradcomp_runner import run_trials
from batchlab.analysis.gradcomp_trials import TrialRun
from batchlab.data import load_dataset, prepare
from batchlab.nn.models import build_mlp
from batchlab.runs.store import Store
from batchlab.runs.tasks import threads


def naive_trial(model, x, y, batch_sizes, lr=0.01) -> dict[int, float]:
    """Seconds per batch size for the straightforward loop."""
    out = {}
    for b in batch_sizes:
        t0 = time.perf_counter()
        net = copy.deepcopy(model)
        opt = torch.optim.SGD(net.parameters(), lr=lr)
        total = torch.zeros_like(net[-2].weight)
        for s in range(0, len(y), b):
            loss = F.nll_loss(net(x[s:s + b]), y[s:s + b])
            opt.zero_grad()
            loss.backward()
            total += net[-2].weight.grad
            opt.step()
        float(total.norm())
        out[b] = time.perf_counter() - t0
    return out


def backend_trial(model, x, y, batch_sizes, backend, lr=0.01) -> dict[int, float]:
    """Seconds per batch size for one trial on one thread with one trial backend."""
    out = {}
    with threads(1):
        for b in batch_sizes:
            t0 = time.perf_counter()
            res = gc.run_trial_block(model, x[None], y[None], b, lr, ["displacement"], backend)
            float(res["displacement"].norm())
            out[b] = time.perf_counter() - t0
    return out


def experiment_trials(model, data, seeds, batch_sizes, n) -> dict[int, float]:
    """Seconds per trial per batch size through `run_trials`, exactly as the experiment
    runs trials (default backend, workers and K; no tensors kept)."""
    out = {}
    with tempfile.TemporaryDirectory() as tmp, Store(Path(tmp) / "bench.db") as st:
        for b in batch_sizes:  # wall time of each batch size's trials on all workers
            run = TrialRun("bench", seeds, [None] * len(seeds), [b], ["displacement"],
                           n_samples=n)
            t0 = time.perf_counter()
            run_trials(run, model, data.x_train, data.y_train, st, keep_tensors=False)
            out[b] = (time.perf_counter() - t0) / len(seeds)
    return out


def copy_bandwidth(mb: int = 256, reps: int = 5) -> float:
    """Bytes/s of a large tensor copy (read + write counted), best of `reps`."""
    a = torch.ones(mb * 2**20 // 4)
    b = torch.empty_like(a)
    best = math.inf
    for _ in range(reps):
        t0 = time.perf_counter()
        b.copy_(a)
        best = min(best, time.perf_counter() - t0)
    return 2 * a.numel() * 4 / best


def bytes_per_step(model, backend: str, rank: int = gc.DEFERRED_RANK) -> float:
    """Bytes one plain-SGD step at b=1 moves (activations, ~2k floats, neglected).

    fused (the textbook step): the forward reads every W and b; the backward reads W of every
    layer but the first (input gradient); the in-place update reads and writes every W and b.
    deferred: per step the forward reads W of the hidden layers after the first, the backward
    reads W of every layer after the first, the small last layer is updated in place; per
    chunk of `rank` steps the first layer's weights are read once (X W^T for the chunk) and
    every deferred layer's weights are read and written once (the rank-R update); per step
    the history products read on average rank/2 rows of U and V per deferred layer.
    """
    lins = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    p = [m.weight.numel() + m.bias.numel() for m in lins]
    w = [m.weight.numel() for m in lins]
    if backend == "fused":
        return 4 * (3 * sum(p) + sum(w[1:]))
    dims = [(m.out_features, m.in_features) for m in lins]
    per_step = sum(w[1:-1]) + sum(w[1:]) + 3 * p[-1]
    per_chunk = w[0] + 2 * sum(w[:-1])
    history = sum((rank / 2) * (o + i) * (1 if k == 0 else 2)
                  for k, (o, i) in enumerate(dims[:-1]))
    return 4 * (per_step + per_chunk / rank + history)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--naive-trials", type=int, default=1)
    ap.add_argument("--trials", type=int, default=4, help="trials through run_trials")
    ap.add_argument("--naive-threads", type=int, default=None,
                    help="naive loop threads (default: torch's default, what a user gets)")
    args = ap.parse_args()

    raw = load_dataset("mnist-5k")
    data = prepare(raw)
    model = build_mlp(784, [1024, 1024], 10, init="glorot", seed=0)
    bs = list(gc.BATCH_SIZES)
    n = 1024
    seeds = gc.trial_seeds(0, "bench", max(args.trials, args.naive_trials))
    default_threads = torch.get_num_threads()
    cpu = torch.device("cpu")
    print(f"torch {torch.__version__}, {default_threads} threads; model 784-1024-1024-10; "
          f"{n} samples; batch sizes {bs}")

    naive = {b: 0.0 for b in bs}
    naive_threads = args.naive_threads or default_threads
    with threads(naive_threads):
        for s in seeds[:args.naive_trials]:
            idx = gc.sample_indices(data.n_train, n, s)
            for b, t in naive_trial(model, data.x_train[idx], data.y_train[idx], bs).items():
                naive[b] += t / args.naive_trials
    fast = experiment_trials(model, data, seeds[:args.trials], bs, n)
    idx = gc.sample_indices(data.n_train, n, seeds[0])
    single = {e: backend_trial(model, data.x_train[idx], data.y_train[idx], bs, e)
              for e in gc.BACKENDS}

    print(f"\nseconds per trial (displacement mode; naive: {naive_threads} thread(s), "
          f"{args.naive_trials} trial(s); batchlab: run_trials, {args.trials} trials, "
          f"backend {gc.default_backend(cpu)}, {gc.default_workers(cpu)} single-threaded "
          f"workers; single stream: one trial, one thread)")
    print(f"{'b':>6} {'steps':>6} {'naive s':>9} {'batchlab s':>11} {'speedup':>8} | "
          f"{'deferred 1thr':>13} {'fused 1thr':>11} {'workers gain':>12}")
    for b in bs:
        d, f = single["deferred"][b], single["fused"][b]
        print(f"{b:>6} {math.ceil(n / b):>6} {naive[b]:>9.3f} {fast[b]:>11.3f} "
              f"{naive[b] / fast[b]:>7.2f}x | {d:>13.3f} {f:>11.3f} {d / fast[b]:>11.2f}x")
    tn, tf = sum(naive.values()), sum(fast.values())
    td, tfu = sum(single["deferred"].values()), sum(single["fused"].values())
    speedup = tn / tf
    print(f"{'trial':>6} {sum(math.ceil(n / b) for b in bs):>6} {tn:>9.3f} {tf:>11.3f} "
          f"{speedup:>7.2f}x | {td:>13.3f} {tfu:>11.3f} {td / tf:>11.2f}x")

    # Two consistent pairings: the experiment's b=1 pass (every core busy: wall time / steps)
    # against the copy bandwidth of every core, and one trial on one thread against the
    # copy bandwidth of one thread. The first is the target; the second shows one stream.
    bw = copy_bandwidth()
    with threads(1):
        bw1 = copy_bandwidth()
    print(f"\nb=1 step vs the bandwidth bound (bytes the step moves / DRAM copy bandwidth, "
          f"best of 5 copies of 256 MB: {bw / 1e9:.1f} GB/s on {default_threads} threads, "
          f"{bw1 / 1e9:.1f} GB/s on 1)")
    nbytes = {e: bytes_per_step(model, e) for e in gc.BACKENDS}
    backend = gc.default_backend(cpu)
    step = fast[1] / n
    ratio = step / (nbytes[backend] / bw)
    print(f"  experiment ({backend}, {gc.default_workers(cpu)} workers): {step * 1e3:.3f} ms per "
          f"step; {nbytes[backend] / 1e6:.1f} MB/step -> bound {nbytes[backend] / bw * 1e3:.3f} "
          f"ms; step / bound = {ratio:.2f}")
    for e in gc.BACKENDS:  # best of 3 passes at b=1
        t = min([single[e][1]] + [backend_trial(model, data.x_train[idx], data.y_train[idx],
                                               [1], e)[1] for _ in range(2)]) / n
        print(f"  one stream ({e}, 1 thread): {t * 1e3:.3f} ms per step; "
              f"{nbytes[e] / 1e6:.1f} MB/step -> bound {nbytes[e] / bw1 * 1e3:.3f} ms; "
              f"step / bound = {t / (nbytes[e] / bw1):.2f}")

    print("\nK stacked trials, one thread (seconds per trial, min(32, 1024/b) steps; lower is "
          "better):")
    with threads(1):
        for b in (1, 8, 64, 256):
            line = [f"b={b:<4}"]
            for k in (1, 2, 4):
                idx = torch.stack([gc.sample_indices(data.n_train, min(n, 32 * b), s)
                                   for s in gc.trial_seeds(1, "k", k)])
                t0 = time.perf_counter()
                gc.run_block(model, data.x_train[idx], data.y_train[idx], b, 0.01)
                line.append(f"K={k}: {(time.perf_counter() - t0) / k:.4f}")
            print("  ".join(line))

    ok1, ok2 = speedup >= 3.0, ratio <= 1.5
    print(f"\n{'PASS' if ok1 else 'FAIL'}: whole trial {speedup:.2f}x the naive loop (target >= 3x)")
    print(f"{'PASS' if ok2 else 'FAIL'}: b=1 step ({backend}, as the experiment runs) {ratio:.2f}x "
          f"the bandwidth bound (target <= 1.5x)")

if __name__ == "__main__":
    main()
