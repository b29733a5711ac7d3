"""Is `batchlab recommend` right? Its recommendation checked against a ground-truth sweep.

Per task (a model on a data set):
1. `recommend` (the library call the CLI makes) gives B_rec, lr_rec, B_simple and the steps it
   predicts to reach the training loss its measurement run reached (the *target*).
2. The ground truth: for every batch size 16..4096 (powers of two), SGD with the lr tuned on a
   small log grid (factor 2 apart, centred on square-root scaling from lr 0.1 at batch 128, and
   widened while the best lr lies on an edge), each run trained until its training loss reaches
   the same target (checked 4 times an epoch on 1024 training examples by the `target_step` probe) or its budget
   runs out. Steps-to-target per batch size = the best lr's; time-to-target = those steps x the
   seconds/step timed on this device (the store's throughput points: the wall clock of the sweep
   runs also holds their target checks and evaluations, and the machine is shared); B_crit =
   E_min/S_min from the fit S(B) = S_min + E_min/B.
3. One run at the recommended (B_rec, lr_rec) to the same target.

Reported per task: time-to-target at (B_rec, lr_rec) / the best measured time-to-target (goal
<= 1.25), predicted / measured steps at (B_rec, lr_rec) (goal within +-30%), B_simple / fitted
B_crit, and recommend's wall time / the sweep's summed wall time. Every run and every throughput
point goes through the results store (`--store`), so a rerun recomputes nothing already there.
Figures (`<task>.png` under `--out`): measured time-to-target vs B with the recommendation.

Reduced scale for a small CPU: `--max-train`, `--lr-points`, `--batch-min/--batch-max`,
`--hidden`, `--max-epochs`.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from batchlab.analysis.scaling import best_per_batch, fit_scaling, outcome
from batchlab.analysis.throughput import measure_stored
from batchlab.config import make_config
from batchlab.data import TensorData, load_dataset
from batchlab.nn.models import build_mlp
from batchlab.probes.noise_scale import TargetStepProbe
from batchlab.recommend import recommend
from batchlab.runs.store import Store
from batchlab.runs.training import train

ROOT = Path(__file__).resolve().parents[1]
MNIST_24K = ROOT.parent / "shared" / "data" / "mnist-24k"
TASKS = {  # name -> (dataset, data_dir, model)
    "mnist-mlp": ("mnist", str(MNIST_24K), "mlp"),
    "fashion-mlp": ("fashion-mnist", None, "mlp"),
    "mnist-cnn": ("mnist", str(MNIST_24K), "cnn"),
}
B0, LR0 = 128, 0.1
# the target is checked on a fixed 1024-example subset of the training set 4 times an epoch
# (more would cost more than the small-batch training it checks on this CPU)
CHECKS_PER_EPOCH, TRAIN_SUBSET = 4, 1024  # recommend's defaults; also the centre of the ground truth's lr grid


class LeNet(nn.Module):
    """A LeNet-sized CNN on flat 28x28 inputs, log-softmax output (the built-in `cnn` model's
    shape, defined here until it is on main)."""

    def __init__(self, n_classes: int = 10) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Unflatten(1, (1, 28, 28)), nn.Conv2d(1, 6, 5, padding=2), nn.ReLU(),
            nn.MaxPool2d(2), nn.Conv2d(6, 16, 5), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
            nn.Linear(400, 120), nn.ReLU(), nn.Linear(120, 84), nn.ReLU(),
            nn.Linear(84, n_classes), nn.LogSoftmax(dim=-1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def make_model(kind: str, td: TensorData, hidden: list[int], seed: int) -> nn.Module:
    if kind == "cnn":
        torch.manual_seed(seed)
        return LeNet(td.n_classes)
    return build_mlp(td.input_dim, hidden, td.n_classes, seed=seed)


def task_data(dataset: str, data_dir: str | None, max_train: int | None, max_test: int,
              seed: int = 0) -> TensorData:
    """A seeded random subset of the training set (every class in proportion), [0, 1] pixels,
    the first `max_test` test images; the fingerprint covers the subset."""
    raw = load_dataset(dataset, data_dir)
    n = len(raw.y_train)
    idx = np.sort(np.random.default_rng(seed).permutation(n)[: max_train or n])
    xtr = torch.from_numpy(raw.x_train[idx].reshape(len(idx), -1)).float() / 255
    ytr = torch.from_numpy(raw.y_train[idx]).long()
    xte = torch.from_numpy(raw.x_test[:max_test].reshape(min(max_test, len(raw.y_test)), -1)).float() / 255
    yte = torch.from_numpy(raw.y_test[:max_test]).long()
    fp = hashlib.sha256(f"{raw.fingerprint}:{max_train}:{max_test}:{seed}".encode()).hexdigest()
    return TensorData(x_train=xtr, y_train=ytr, eval_sets={"train": (xtr, ytr), "test": (xte, yte)},
                      input_dim=int(xtr.shape[1]), n_classes=10, fingerprint=fp)


def to_target(model: nn.Module, td: TensorData, store: Store, bs: int, lr: float, target: float,
              budget_epochs: int, label: str) -> dict[str, Any]:
    """One SGD run until the training loss reaches `target` (through the store)."""
    cfg = make_config(batch_size=bs, lr=lr, epochs=budget_epochs, seed=0, device="cpu",
                      probes=[], target_metric="train_loss", target_value=target)
    # the probe's settings are constants of this benchmark (so its store entries stay valid)
    probe = TargetStepProbe(checks_per_epoch=CHECKS_PER_EPOCH, train_subset=TRAIN_SUBSET)
    res = train(cfg, model=model, data=td, store=store, label=label, probes=[probe])
    o = outcome(res)
    return {"batch_size": bs, "lr": lr, "status": res.status, "reached": o.reached,
            "steps_to_target": o.steps, "best_value": o.best, "budget_steps": o.budget_steps,
            "wall_seconds": res.wall_seconds, "cached": res.cached}


def tune(model_fn, td: TensorData, store: Store, bs: int, target: float, points: int,
         budget_epochs: int, label: str, max_widen: int = 3) -> list[dict[str, Any]]:
    """Runs at lrs factor 2 apart around sqrt scaling; widened while the best is on an edge.
    Once an lr has reached the target in S steps, the others get S steps (rounded up to an
    epoch) as their budget: an lr that needs more is not the best, and need not finish."""
    centre = LR0 * math.sqrt(bs / B0)
    rows: dict[int, dict[str, Any]] = {}

    def run(k: int) -> None:
        reached = [r["steps_to_target"] for r in rows.values() if r["reached"]]
        epochs = budget_epochs
        if reached:
            epochs = min(epochs, math.ceil(min(reached) * bs / td.n_train))
        rows[k] = to_target(model_fn(), td, store, bs, centre * 2.0**k, target, epochs, label)

    for k in sorted(range(-(points // 2), points - points // 2), key=abs):
        run(k)
    for _ in range(max_widen):
        best = best_per_batch(list(rows.values()))[0]
        k_best = next(k for k, r in rows.items() if r["lr"] == best["lr"])
        lo, hi = min(rows), max(rows)
        if not best["reached"]:
            step = lo - 1 if all(r["status"] == "diverged" for r in rows.values()) else hi + 1
        elif k_best == hi and rows[hi]["status"] != "diverged":
            step = hi + 1
        elif k_best == lo:
            step = lo - 1
        else:
            break
        run(step)
    return [rows[k] for k in sorted(rows)]


def budget(bs: int, s0: int, n: int, factor: float, max_epochs: int) -> int:
    """Epochs allowed: `factor` x the measurement run's steps, scaled by B0/B below B0 (the
    perfect-scaling regime needs proportionally more steps), capped at max_epochs."""
    steps = factor * s0 * max(1.0, B0 / bs)
    return max(1, min(max_epochs, math.ceil(steps * bs / n)))


def run_task(name: str, args: argparse.Namespace, store: Store) -> dict[str, Any]:
    dataset, data_dir, kind = TASKS[name]
    td = task_data(dataset, data_dir, args.max_train, args.max_test)
    hidden = [int(h) for h in args.hidden.split(",")]

    def model_fn() -> nn.Module:
        return make_model(kind, td, hidden, seed=0)

    saved = args.out / name / "recommend.json"
    if args.reuse_recommend and saved.exists():  # the report of an earlier run, and its cost
        rep = json.loads(saved.read_text())
        rec_seconds = float(rep["evidence"]["seconds"])
    else:
        t0 = time.perf_counter()
        rep = recommend(model_fn(), td, device=torch.device("cpu"), base_batch=B0, base_lr=LR0,
                        seed=0, out_dir=args.out / name, model_name=f"{kind} ({name})",
                        max_batch=args.batch_max, store=store)
        rec_seconds = time.perf_counter() - t0
    mr = rep["evidence"]["measurement_run"]
    target = float(f"{mr['train_loss']:.4g}")
    s0, n = int(mr["steps"]), td.n_train
    sizes = [2**k for k in range(int(math.log2(args.batch_min)), int(math.log2(args.batch_max)) + 1)
             if 2**k <= n]
    print(f"[{name}] n={n} target train_loss <= {target} (measurement run: {s0} steps at "
          f"B={B0}); recommend: B={rep['recommended_batch_size']} lr={rep['recommended_lr']:.4g} "
          f"B_simple={rep['noise_scale']['b_simple']:.4g} ({rec_seconds:.0f} s)", flush=True)

    runs: list[dict[str, Any]] = []
    for bs in sizes:
        runs += tune(model_fn, td, store, bs, target, args.lr_points,
                     budget(bs, s0, n, args.budget_factor, args.max_epochs), f"recacc:{name}")
        b = best_per_batch([r for r in runs if r["batch_size"] == bs])[0]
        print(f"[{name}]  B={bs:5d} best lr {b['lr']:.4g}: "
              f"{str(b['steps_to_target']) + ' steps' if b['reached'] else 'not reached'}", flush=True)
    tp = {r["batch_size"]: r for r in measure_stored(model_fn(), td.x_train, td.y_train,
                                                      sorted(set(sizes)), store)
          if r.get("status") == "ok"}
    best = best_per_batch(runs)
    for r in best:
        sps = tp.get(r["batch_size"], {}).get("seconds_per_step")
        r["seconds_per_step"] = sps
        r["time_to_target_s"] = r["steps_to_target"] * sps if r["reached"] and sps else None
    reached = [r for r in best if r["reached"]]
    fit = (fit_scaling([r["batch_size"] for r in reached], [r["steps_to_target"] for r in reached])
           if len(reached) >= 2 else None)
    timed = [r for r in best if r["time_to_target_s"] is not None]
    gt_best = min(timed, key=lambda r: r["time_to_target_s"]) if timed else None

    b_rec, lr_rec = int(rep["recommended_batch_size"]), float(rep["recommended_lr"])
    rec_run = to_target(model_fn(), td, store, b_rec, lr_rec, target,
                        budget(b_rec, s0, n, args.budget_factor, args.max_epochs),
                        f"recacc:{name}:rec")
    sps_rec = tp.get(b_rec, {}).get("seconds_per_step")
    rec_time = rec_run["steps_to_target"] * sps_rec if rec_run["reached"] and sps_rec else None
    pred = next((r["predicted_steps"] for r in rep["throughput"] if r["batch_size"] == b_rec), None)
    sweep_seconds = sum(r["wall_seconds"] for r in runs)
    out = {
        "task": name, "n_train": n, "target_train_loss": target, "recommend": rep,
        "recommended_batch_size": b_rec, "recommended_lr": lr_rec, "rec_run": rec_run,
        "ground_truth": best, "fit": fit, "best_measured": gt_best,
        "time_ratio": rec_time / gt_best["time_to_target_s"] if rec_time and gt_best else None,
        "steps_ratio": pred / rec_run["steps_to_target"] if pred and rec_run["reached"] else None,
        "b_simple": rep["noise_scale"]["b_simple"],
        "b_simple_over_b_crit": (rep["noise_scale"]["b_simple"] / fit["b_crit"]
                                 if fit and rep["noise_scale"]["b_simple"] else None),
        "recommend_seconds": rec_seconds, "sweep_seconds": sweep_seconds,
        "cost_fraction": rec_seconds / sweep_seconds if sweep_seconds else None,
        "sweep_runs": runs,
    }
    figure(out, args.out / f"{name}.png")
    (args.out / f"{name}.json").write_text(json.dumps(out, indent=2, default=str))
    return out


def figure(res: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    gt = [r for r in res["ground_truth"] if r["time_to_target_s"] is not None]
    if gt:
        ax.loglog([r["batch_size"] for r in gt], [r["time_to_target_s"] for r in gt], "o-",
                  label="measured (best lr per B)")
    rr = res["rec_run"]
    if res["time_ratio"] is not None and res["best_measured"]:
        t = res["time_ratio"] * res["best_measured"]["time_to_target_s"]
        ax.loglog([rr["batch_size"]], [t], "r*", ms=14,
                  label=f"recommended B={rr['batch_size']}, lr={rr['lr']:.3g}")
    ax.axvline(res["recommended_batch_size"], color="r", ls=":", lw=1)
    ax.set_xlabel("batch size")
    ax.set_ylabel(f"time to train loss <= {res['target_train_loss']} (s)")
    ax.set_title(f"{res['task']}: time to target (ratio {_f(res['time_ratio'])})")
    ax.legend(fontsize=8)
    st = [r for r in res["ground_truth"] if r["reached"]]
    if st:
        b = np.array([r["batch_size"] for r in st])
        ax2.loglog(b, [r["steps_to_target"] for r in st], "o", label="measured steps (best lr)")
        grid = np.geomspace(b.min(), b.max(), 100)
        if res["fit"]:
            f = res["fit"]
            ax2.loglog(grid, f["s_min"] + f["e_min"] / grid, "C1-",
                       label=f"fit, B_crit={f['b_crit']:.3g}")
    pr = [r for r in res["recommend"]["throughput"] if r.get("predicted_steps")]
    if pr:
        ax2.loglog([r["batch_size"] for r in pr], [r["predicted_steps"] for r in pr], "C2--",
                   label=f"recommend's prediction (B_crit={res['recommend']['critical_batch_size']:.3g})")
    ax2.set_xlabel("batch size")
    ax2.set_ylabel("steps to target")
    ax2.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _f(v: Any, fmt: str = ".3g") -> str:
    return format(v, fmt) if isinstance(v, (int, float)) else "n/a"


def table(results: list[dict[str, Any]]) -> str:
    head = ("| task | B_rec | lr_rec | best measured (B, lr) | time ratio (<=1.25) | "
            "pred/measured steps (0.7-1.3) | B_simple | B_crit fit | B_simple/B_crit | "
            "recommend s / sweep s |")
    lines = [head, "|" + "---|" * 10]
    for r in results:
        bm = r["best_measured"]
        lines.append(
            f"| {r['task']} | {r['recommended_batch_size']} | {r['recommended_lr']:.3g} | "
            f"{(bm['batch_size'], round(bm['lr'], 4)) if bm else 'n/a'} | {_f(r['time_ratio'], '.2f')} | "
            f"{_f(r['steps_ratio'], '.2f')} | {_f(r['b_simple'])} | "
            f"{_f(r['fit']['b_crit'] if r['fit'] else None)} | {_f(r['b_simple_over_b_crit'])} | "
            f"{r['recommend_seconds']:.0f} / {r['sweep_seconds']:.0f} = {_f(r['cost_fraction'], '.2f')} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tasks", default=",".join(TASKS), help=f"comma-separated of {list(TASKS)}")
    p.add_argument("--out", type=Path, default=Path("out/recommend-accuracy"))
    p.add_argument("--store", type=Path, default=None, help="results store (default OUT/store.db)")
    p.add_argument("--max-train", type=int, default=None, help="training examples (seeded subset)")
    p.add_argument("--max-test", type=int, default=1000)
    p.add_argument("--hidden", default="1024,1024", help="MLP widths")
    p.add_argument("--lr-points", type=int, default=3, help="lrs per batch size before widening")
    p.add_argument("--batch-min", type=int, default=16)
    p.add_argument("--batch-max", type=int, default=4096)
    p.add_argument("--budget-factor", type=float, default=4.0)
    p.add_argument("--max-epochs", type=int, default=100)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--reuse-recommend", action="store_true",
                   help="use OUT/TASK/recommend.json from an earlier run instead of rerunning it")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    store = Store(args.store or args.out / "store.db")
    results = []
    for name in args.tasks.split(","):
        if name not in TASKS:
            print(f"unknown task {name!r}; choose from {list(TASKS)}", file=sys.stderr)
            return 2
        results.append(run_task(name, args, store))
        print(table(results), flush=True)
    md = table(results)
    (args.out / "summary.md").write_text(f"command: {' '.join(sys.argv)}\n\n{md}\n")
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
