"""Benchmark: one gradient-competition trial, naive loop vs batchlab.

Prints, in one run:
  1. seconds per trial per batch size: the naive loop (autograd + torch.optim.SGD, a fresh
     deepcopy of the model per batch size, a Python loop over steps - what the study would
     write) vs batchlab (`batchlab.gradcomp`, fused manual backward, grad sink), both
     computing the `displacement` mode (batchlab's one trajectory also yields `sample-sum`);
  2. batchlab's per-step time at b=1 against the memory-bandwidth bound: bytes moved per
     fused step / measured DRAM copy bandwidth (a 256 MB copy, far larger than the caches);
  3. trials per second for K stacked trials at a few batch sizes (how `default_k` was chosen).
Targets on a 2-core CPU: >= 3x the naive loop over the whole trial, b=1 step within 1.5x of
the bandwidth bound. PASS/FAIL is computed from the measured numbers.

    python benchmarks/gradient_competition.py [--naive-trials 1] [--trials 2] [--naive-threads N] [--threads N]
"""

from __future__ import annotations

import argparse
import copy
import math
import time

import torch
import torch.nn.functional as F

from batchlab import gradcomp as gc
from batchlab.data import load_dataset, prepare
from batchlab.models import build_mlp


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


def batchlab_trial(model, x, y, batch_sizes, lr=0.01, threads=None) -> dict[int, float]:
    """One trial as the experiment runs it: per batch size, the thread count the experiment
    uses (`gc.default_threads(cpu, b)`) unless `threads` forces one."""
    out = {}
    for b in batch_sizes:
        with gc._threads(threads or gc.default_threads(torch.device("cpu"), b)):
            t0 = time.perf_counter()
            res = gc.run_trial_block(model, x[None], y[None], b, lr, ["displacement"])
            float(res["displacement"].norm())
            out[b] = time.perf_counter() - t0
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


def bytes_per_step(model) -> int:
    """Weight traffic of one fused plain-SGD step at b=1: the forward reads every W and b;
    the backward reads W of every layer but the first (input gradient); the in-place update
    reads and writes every W and b. Activations (~2k floats) are negligible."""
    lins = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    p = sum(m.weight.numel() + m.bias.numel() for m in lins)
    gin = sum(m.weight.numel() for m in lins[1:])
    return 4 * (3 * p + gin)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--naive-trials", type=int, default=1)
    ap.add_argument("--trials", type=int, default=2)
    ap.add_argument("--naive-threads", type=int, default=None,
                    help="naive loop threads (default: torch's default, what a user gets)")
    ap.add_argument("--threads", type=int, default=None,
                    help="batchlab intra-op threads (default: batchlab's own choice)")
    args = ap.parse_args()

    raw = load_dataset("mnist-5k")
    data = prepare(raw)
    model = build_mlp(784, [1024, 1024], 10, init="glorot", seed=0)
    bs = list(gc.BATCH_SIZES)
    n = 1024
    seeds = gc.trial_seeds(0, "bench", max(args.trials, args.naive_trials))
    default_threads = torch.get_num_threads()
    print(f"torch {torch.__version__}, {default_threads} threads; model 784-1024-1024-10; "
          f"{n} samples; batch sizes {bs}")

    naive = {b: 0.0 for b in bs}
    naive_threads = args.naive_threads or default_threads
    torch.set_num_threads(naive_threads)
    for s in seeds[:args.naive_trials]:
        idx = gc.sample_indices(data.n_train, n, s)
        for b, t in naive_trial(model, data.x_train[idx], data.y_train[idx], bs).items():
            naive[b] += t / args.naive_trials
    torch.set_num_threads(default_threads)
    threads = args.threads or f"1 below b={gc.SINGLE_THREAD_BELOW}, else {default_threads}"
    fast = {b: 0.0 for b in bs}
    for s in seeds[:args.trials]:
        idx = gc.sample_indices(data.n_train, n, s)
        for b, t in batchlab_trial(model, data.x_train[idx], data.y_train[idx], bs,
                                   threads=args.threads).items():
            fast[b] += t / args.trials
    torch.set_num_threads(1)

    print(f"\nseconds per trial (displacement mode; naive: {naive_threads} thread(s), "
          f"{args.naive_trials} trial(s); batchlab: {threads} thread(s), {args.trials} trials)")
    print(f"{'b':>6} {'steps':>6} {'naive s':>9} {'batchlab s':>11} {'speedup':>8}")
    for b in bs:
        print(f"{b:>6} {math.ceil(n / b):>6} {naive[b]:>9.3f} {fast[b]:>11.3f} "
              f"{naive[b] / fast[b]:>7.2f}x")
    tn, tf = sum(naive.values()), sum(fast.values())
    speedup = tn / tf
    print(f"{'trial':>6} {sum(math.ceil(n / b) for b in bs):>6} {tn:>9.3f} {tf:>11.3f} "
          f"{speedup:>7.2f}x")

    bw = copy_bandwidth()
    step_bytes = bytes_per_step(model)
    bound = step_bytes / bw
    step = fast[1] / n
    ratio = step / bound
    print(f"\nb=1 step: {step * 1e3:.3f} ms; bytes/step {step_bytes / 1e6:.1f} MB; "
          f"copy bandwidth (256 MB) {bw / 1e9:.1f} GB/s -> bound {bound * 1e3:.3f} ms; "
          f"step / bound = {ratio:.2f}")

    print("\nK stacked trials (seconds per trial, min(32, 1024/b) steps; lower is better):")
    for b in (1, 8, 64, 256):
        line = [f"b={b:<4}"]
        for k in (1, 2, 4):
            idx = torch.stack([gc.sample_indices(data.n_train, min(n, 32 * b), s)
                               for s in gc.trial_seeds(1, "k", k)])
            t0 = time.perf_counter()
            gc.run_block(model, data.x_train[idx], data.y_train[idx], b, 0.01)
            line.append(f"K={k}: {(time.perf_counter() - t0) / k:.4f}")
        print("  ".join(line))
    torch.set_num_threads(default_threads)

    ok1, ok2 = speedup >= 3.0, ratio <= 1.5
    print(f"\n{'PASS' if ok1 else 'FAIL'}: whole trial {speedup:.2f}x the naive loop (target >= 3x)")
    print(f"{'PASS' if ok2 else 'FAIL'}: b=1 step {ratio:.2f}x the bandwidth bound "
          f"(target <= 1.5x)")


if __name__ == "__main__":
    main()
