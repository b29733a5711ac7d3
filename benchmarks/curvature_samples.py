"""How many examples sharpness's Hessian needs: lambda_max and the trace of small- and
large-batch minimizers on nested subsamples of the training set (issue 21: can the paper
preset's `curvature_samples` be smaller without weakening a verdict?).

Trains sharpness's pair as its runs do (SGD momentum 0.9, lr 0.01; batch 64 for --epochs, a
tenth of the training set for 3 x --epochs) and measures, on the first n examples for each n
in --samples: lambda_max (Lanczos, error bound 1e-3, as `sharpness_units.top_eigenvalue`) and
the trace (Hutch++, --rtol at 95%, as `sharpness_units.trace`), with the products spent; and,
for comparison, the relative half-width that the old 50-probe Hutchinson would give there
(1.96 sd / (sqrt(50) tr), sd of z^T H z over those 50 probes). The claims compare
lambda_max large / small (K2) and switched / large (K5), so the figure that matters is how
much the ratio moves between subsample sizes, against the ratio's distance from 1 and its
seed-to-seed spread.

Usage: python benchmarks/curvature_samples.py --data-dir DIR [--hidden 256,256] [--seeds 2]
"""

from __future__ import annotations

import argparse
import math
import time

import numpy as np
import torch

from batchlab.engine.setup import get_data
from batchlab.measure import curvature as C
from batchlab.runs.training import train


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", default=None, help="MNIST IDX folder (default: mnist-5k)")
    ap.add_argument("--hidden", default="256,256")
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--seeds", type=int, default=1)
    ap.add_argument("--samples", default="1000,4096,10000")
    ap.add_argument("--rtol", default="0.05,0.07",
                    help="Hutch++ targets (95%% half-width / estimate); the first is tabulated "
                         "in full, the others by their products")
    ap.add_argument("--h50", default="1000,10000",
                    help="subsample sizes at which to also run 50 Hutchinson probes")
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    data = {"dataset": "mnist", "data_dir": a.data_dir} if a.data_dir else {"dataset": "mnist-5k"}
    hidden = [int(h) for h in a.hidden.split(",")]
    sizes = [int(s) for s in a.samples.split(",")]
    h50_at = {int(s) for s in a.h50.split(",") if s}
    rtols = [float(r) for r in a.rtol.split(",")]
    lam: dict[tuple[int, str, int], float] = {}
    print(f"{'seed':>4} {'regime':6} {'n':>6} {'lambda_max':>10} {'trace':>9} {'+-95%':>6} "
          f"{'hutch++ HVPs':>12} {'H50 +-95%':>9} {'s':>6}", flush=True)
    for seed in range(a.seeds):
        base = {**data, "hidden": hidden, "lr": 0.01, "momentum": 0.9, "probes": [], "seed": seed}
        small = train({**base, "batch_size": 64, "epochs": a.epochs})
        n_train = get_data(small.config, torch.device("cpu")).n_train
        large = train({**base, "batch_size": max(65, n_train // 10), "epochs": 3 * a.epochs})
        td = get_data(small.config, torch.device("cpu"))
        for regime, res in (("small", small), ("large", large)):
            model = res.model.eval()
            for n in sizes:
                n = min(n, n_train)
                d = (td.x_train[:n], td.y_train[:n])
                t0 = time.perf_counter()
                eig = C.hessian_eigenvalues(model, d, k=1, tol=1e-3, max_iter=100, seed=seed)
                tr = C.hessian_trace(model, d, method="hutch++", rtol=rtols[0], seed=seed)
                more = [C.hessian_trace(model, d, method="hutch++", rtol=r, seed=seed)
                        for r in rtols[1:]]
                h50w = math.nan
                if n in h50_at:
                    h50 = C.hessian_trace(model, d, n_samples=50, seed=seed)
                    h50w = 1.96 * float(np.std(h50.samples, ddof=1)) / math.sqrt(50) / abs(
                        h50.estimate)
                lam[(seed, regime, n)] = eig.top
                print(f"{seed:4d} {regime:6} {n:6d} {eig.top:10.4f} {tr.estimate:9.3f} "
                      f"{1.96 * tr.stderr / abs(tr.estimate):6.1%} {tr.n_hvp:12d} "
                      f"{h50w:9.1%} "
                      f"{time.perf_counter() - t0:6.1f}  "
                      + " ".join(f"rtol {r:g}: {m.n_hvp} HVPs, +-{1.96 * m.stderr / abs(m.estimate):.1%}"
                                 for r, m in zip(rtols[1:], more)), flush=True)
    print("\nlambda_max large / small per seed and n; change against the largest n:")
    top = min(sizes[-1], n_train)
    for seed in range(a.seeds):
        ref = lam[(seed, "large", top)] / lam[(seed, "small", top)]
        for n in sizes:
            n = min(n, n_train)
            r = lam[(seed, "large", n)] / lam[(seed, "small", n)]
            ch = {g: lam[(seed, g, n)] / lam[(seed, g, top)] - 1 for g in ("small", "large")}
            print(f"  seed {seed} n {n:6d}: ratio {r:.4f} ({r / ref - 1:+.2%}); lambda_max "
                  f"small {ch['small']:+.2%}, large {ch['large']:+.2%}")


if __name__ == "__main__":
    main()
