"""Training throughput of batchlab's engine vs. a hand-written PyTorch loop vs. the matmul roofline.

    python benchmarks/throughput.py [--data-dir DIR] [--repeats 3] [--threads N]

For the default MLP (784-1024-1024-10, plain SGD at lr 0.01) and batch sizes 1, 8, 64, 256, 1024:

(a) batchlab: `batchlab.train` itself; the time is the `seconds` it reports for an epoch,
    which covers its whole step path (randperm, index_select batching, the fused SGD step,
    loss accumulation) and excludes evaluation.
(b) plain: what people write by hand: `DataLoader(TensorDataset(X, Y), batch_size=b,
    shuffle=True)`, `nn.Sequential`, `torch.optim.SGD`, `F.nll_loss`, same tensors, same number
    of samples, same loss bookkeeping.
(c) roofline: GFLOP/s of a large fp32 square matmul on this machine (best of several).

(a) and (b) alternate repeat by repeat, so a burst of load from other processes hits both; each
batch size gets one warm-up run of each first, then the median of the repeats is reported.
Achieved GFLOP/s counts 6 x parameters FLOPs per sample (forward 2P, backward 4P).

Targets (issue 2): >= 1.0x plain at every batch size, >= 1.3x at b <= 8, >= 85% of the
roofline at b >= 256. Timings are only comparable within one run on one machine.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from batchlab.config import make_config
from batchlab.data import load_dataset, prepare
from batchlab.nn.models import build_mlp, n_params
from batchlab.runs.training import train

ROOT = Path(__file__).resolve().parents[1]
SHARED_MNIST = ROOT.parent / "shared" / "data" / "mnist-24k"
BATCH_SIZES = (1, 8, 64, 256, 1024)
# samples timed per repeat: enough steps that per-epoch overheads vanish, small enough that
# the whole benchmark stays near 2-3 minutes on 2 cores
SAMPLES = {1: 2000, 8: 6000, 64: 12000, 256: 24000, 1024: 24000}
LR = 0.01
HIDDEN = [1024, 1024]


def roofline_gflops(n: int = 2048, repeats: int = 7) -> float:
    """Best fp32 GFLOP/s of an n x n matmul: the machine's practical compute ceiling."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    out = torch.empty(n, n)
    torch.mm(a, b, out=out)  # warm-up
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        torch.mm(a, b, out=out)
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best / 1e9


def batchlab_epoch_seconds(dataset: str, data_dir: str | None, b: int, n: int, seed: int) -> float:
    """Training seconds of one epoch over `n` samples, as batchlab's engine reports them."""
    cfg = make_config(dataset=dataset, data_dir=data_dir, hidden=HIDDEN, lr=LR, batch_size=b,
                      epochs=1, max_train=n, max_test=1000, seed=seed, device="cpu", probes=[])
    res = train(cfg)
    assert res.status == "completed" and res.epochs[1]["samples"] == n
    return res.epochs[1]["seconds"]


def plain_epoch_seconds(x: torch.Tensor, y: torch.Tensor, b: int, seed: int) -> float:
    """One epoch of the loop people write by hand, on the same tensors."""
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Linear(x.shape[1], HIDDEN[0]), nn.ReLU(),
        nn.Linear(HIDDEN[0], HIDDEN[1]), nn.ReLU(),
        nn.Linear(HIDDEN[1], 10), nn.LogSoftmax(dim=-1),
    )
    for m in model:
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            nn.init.zeros_(m.bias)
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    loader = DataLoader(TensorDataset(x, y), batch_size=b, shuffle=True)
    running = torch.zeros(())
    t0 = time.perf_counter()
    for xb, yb in loader:
        opt.zero_grad()
        loss = F.nll_loss(model(xb), yb)
        loss.backward()
        opt.step()
        running += loss.detach() * len(yb)
    seconds = time.perf_counter() - t0
    assert torch.isfinite(running)
    return seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data-dir", default=str(SHARED_MNIST) if SHARED_MNIST.is_dir() else None,
                    help="directory of MNIST IDX files (default: ../shared/data/mnist-24k if "
                         "present, else the embedded mnist-5k)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=list(BATCH_SIZES))
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    dataset = "mnist" if args.data_dir else "mnist-5k"
    raw = load_dataset(dataset, args.data_dir)
    td = prepare(raw, device="cpu")
    params = n_params(build_mlp(td.input_dim, HIDDEN, 10))
    flops_per_sample = 6 * params
    roof = roofline_gflops()
    print(f"data: {dataset} ({td.n_train} train), model {td.input_dim}-"
          f"{'-'.join(map(str, HIDDEN))}-10 ({params / 1e6:.2f}M params), "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"fp32 matmul roofline: {roof:.1f} GFLOP/s (2048^3 mm, best of 7)\n")

    header = (f"{'batch':>5} {'batchlab/s':>11} {'plain/s':>9} {'ratio':>6} "
              f"{'GFLOP/s':>8} {'%roof':>6}  verdict")
    print(header)
    print("-" * len(header))
    all_ok = True
    t_start = time.perf_counter()
    for b in args.batch_sizes:
        n = min(SAMPLES.get(b, 24000), td.n_train) // b * b  # whole batches only
        x, y = td.x_train[:n], td.y_train[:n]
        # warm-up (allocator, kernels, first-call paths), not timed
        batchlab_epoch_seconds(dataset, args.data_dir, b, min(n, 64 * b), seed=99)
        plain_epoch_seconds(x[: min(n, 64 * b)], y[: min(n, 64 * b)], b, seed=99)
        ours, plain = [], []
        for r in range(args.repeats):
            ours.append(batchlab_epoch_seconds(dataset, args.data_dir, b, n, seed=r))
            plain.append(plain_epoch_seconds(x, y, b, seed=r))
        ours_sps = n / statistics.median(ours)
        plain_sps = n / statistics.median(plain)
        ratio = ours_sps / plain_sps
        gflops = ours_sps * flops_per_sample / 1e9
        frac = gflops / roof
        checks = [ratio >= 1.0]
        if b <= 8:
            checks.append(ratio >= 1.3)
        if b >= 256:
            checks.append(frac >= 0.85)
        ok = all(checks)
        all_ok &= ok
        print(f"{b:>5} {ours_sps:>11.0f} {plain_sps:>9.0f} {ratio:>5.2f}x {gflops:>8.1f} "
              f"{100 * frac:>5.0f}%  {'PASS' if ok else 'FAIL'}", flush=True)
    print(f"\ntargets: >= 1.0x plain everywhere, >= 1.3x at b <= 8, >= 85% roofline at b >= 256"
          f" -> {'PASS' if all_ok else 'FAIL'}  ({time.perf_counter() - t_start:.0f} s)")


if __name__ == "__main__":
    main()
