"""Do batchlab's noise-scale estimators agree inside one training run?

    python benchmarks/gns_estimators.py [--steps 300] [--micro 32] [--k 4] [--threads N]

Trains the default MLP (784-1024-1024-10) on the embedded mnist-5k with SGD on batches of
k x micro examples, accumulated from k micro-batches, and measures B_simple three ways on the
same weights and batches:

  per-example  GradientNoiseScale (B_small = 1, B_big = micro; hooks on the first micro-batch
               of each step, run as its own forward/backward on a copy so the loop is untouched);
  micro-batch  MicroBatchNoiseScale (B_small = micro, B_big = k x micro) on the loop itself;
  offline      batchlab.noise.b_simple from per-example gradients on 2,048 training examples at
               the final weights (bootstrap CI).

The EMAs average over the last ~1/(1 - beta) steps while B_simple grows as the loss falls, so
during training they agree only up to that drift and their own noise. `--lr 0` keeps the
weights fixed: then all three estimate the same number (the offline one on all 4,000 training
examples with `--offline 4000`, the population the batches are drawn from).
Measured (1 thread, shared CPU): `--lr 0 --steps 400 --beta 0.999 --offline 4000`: per-example
86.3, micro-batch 83.5, offline 87.9 [79.2, 92.7]; `--lr 0.05 --steps 400 --beta 0.999
--offline 4000`: 243.4, 324.3, 364.4 [245.5, 485.1] (final weights).
"""

from __future__ import annotations

import argparse
import copy

import torch
import torch.nn.functional as F

from batchlab.data import load_dataset, prepare
from batchlab.measure.gns import GradientNoiseScale
from batchlab.measure.noise import b_simple
from batchlab.measure.noise_micro import MicroBatchNoiseScale
from batchlab.nn.models import build_mlp


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--micro", type=int, default=32)
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--offline", type=int, default=2048, help="examples of the offline estimate")
    ap.add_argument("--beta", type=float, default=0.99, help="EMA factor of both monitors")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    td = prepare(load_dataset("mnist-5k"))
    model = build_mlp(td.input_dim, (1024, 1024), 10, seed=0)
    opt = torch.optim.SGD(model.parameters(), lr=args.lr)
    micro = MicroBatchNoiseScale(model, micro_batch_size=args.micro, beta=args.beta)
    shadow = copy.deepcopy(model)
    per = GradientNoiseScale(shadow, beta=args.beta)
    gen = torch.Generator().manual_seed(0)
    for _ in range(args.steps):
        idx = torch.randint(0, td.n_train, (args.k * args.micro,), generator=gen)
        xb, yb = td.x_train[idx], td.y_train[idx]
        opt.zero_grad()
        for xs, ys in zip(xb.chunk(args.k), yb.chunk(args.k)):
            (F.nll_loss(model(xs), ys) / args.k).backward()
        micro.step()
        shadow.load_state_dict(model.state_dict())
        shadow.zero_grad()
        F.nll_loss(shadow(xb[: args.micro]), yb[: args.micro]).backward()
        per.step()
        opt.step()
    pick = torch.randperm(td.n_train, generator=gen)[: args.offline]
    off = b_simple(model, td.x_train[pick], td.y_train[pick], seed=0)
    print(f"MLP 784-1024-1024-10 on mnist-5k, SGD lr {args.lr}, {args.steps} steps of "
          f"{args.k} x {args.micro} examples, torch {torch.__version__}")
    print(f"  per-example (EMA)  B_simple {per.b_simple:9.1f}")
    print(f"  micro-batch (EMA)  B_simple {micro.b_simple:9.1f}   ratio to per-example "
          f"{micro.b_simple / per.b_simple:5.2f}")
    print(f"  offline (final)    B_simple {off.b_simple:9.1f}   95% CI [{off.ci[0]:.1f}, "
          f"{off.ci[1]:.1f}]   ratio to micro-batch {off.b_simple / micro.b_simple:5.2f}")


if __name__ == "__main__":
    main()
