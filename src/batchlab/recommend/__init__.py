"""`batchlab recommend`: which batch size (and lr) to use for this model, data and device.

Measurements, in order:
1. a short SGD run at a reference batch size B0 and lr (the "measurement run") tracking
   B_simple with the noise-scale probe; at its end B_simple again on more examples with a
   bootstrap CI, the two-batch estimator on the same weights, and B_noise (HVPs) when the model
   is small enough;
2. throughput (samples/s, s/step, memory) vs batch size on this device;
3. with `--thorough`, a small steps-to-target sweep (batch sizes x lrs) whose fit gives
   B_crit = E_min/S_min and whose tuned lrs give the lr scaling rule.

Model (McCandlish et al.): to reach a given loss, S(B) = S_min (1 + B_crit/B) steps and
E(B) = E_min (1 + B/B_crit) examples. Without `--thorough`, B_crit is taken to be B_simple over
the second half of the measurement run (mean tr(Sigma) / mean |G|^2 over its probe points and
the final one, as the paper averages; it grows as training goes on, so later in training larger
batches pay off more), and S_min is anchored by the measurement run itself: it
needed S0 steps at B0, so S(B) = S0 (1 + B_crit/B) / (1 + B_crit/B0) predicts the steps to reach
the same training loss at batch B. Time to that point = S(B) x seconds/step(B); the batch size
for time minimizes it over the measured grid; the batch size for compute is the largest whose
examples-to-target stay within 10% of E_min (B <= 0.1 B_crit), i.e. the most parallel choice that
wastes almost no computation. The lr follows the rule the measurements support: from the tuned
lrs when `--thorough` (the nearest of linear, square-root or constant scaling to the fitted
slope), else the paper's eps(B) proportional to 1/(1 + B_crit/B) (linear below B_crit,
constant above) anchored at the measurement run's lr.
"""

from __future__ import annotations

import copy
import hashlib
import importlib
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console
from torch import nn

from batchlab.errors import BatchlabError, DataError

err = Console(stderr=True)


# -- user code --------------------------------------------------------------------------------
def load_object(spec: str, what: str) -> Any:
    """Import `module:attribute` (the module from sys.path / PYTHONPATH or the current dir)."""
    if ":" not in spec:
        raise BatchlabError(f"--{what} expects module:function, got {spec!r}")
    mod_name, attr = spec.split(":", 1)
    if "" not in sys.path and str(Path.cwd()) not in sys.path:
        sys.path.insert(0, str(Path.cwd()))
    try:
        mod = importlib.import_module(mod_name)
    except Exception as e:  # any failure while importing user code is the user's to fix
        raise BatchlabError(f"cannot import {mod_name!r} for --{what}: {type(e).__name__}: "
                            f"{str(e).splitlines()[0] if str(e) else ''}") from None
    if not hasattr(mod, attr):
        raise BatchlabError(f"module {mod_name!r} has no attribute {attr!r} (--{what})")
    obj = getattr(mod, attr)
    if not callable(obj):
        raise BatchlabError(f"{spec} is not callable (--{what})")
    return obj


def _call(fn: Any, spec: str, what: str) -> Any:
    try:
        return fn()
    except Exception as e:
        raise BatchlabError(f"{spec} raised {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
                            f" (--{what})") from None


def user_model(spec: str) -> nn.Module:
    m = _call(load_object(spec, "model"), spec, "model")
    if not isinstance(m, nn.Module):
        raise BatchlabError(f"{spec} returned {type(m).__name__}, not a torch.nn.Module (--model)")
    if not any(p.requires_grad for p in m.parameters()):
        raise BatchlabError(f"{spec} returned a module without trainable parameters (--model)")
    return m


def user_data(spec: str) -> tuple[torch.Tensor, torch.Tensor]:
    out = _call(load_object(spec, "data"), spec, "data")
    if not isinstance(out, (tuple, list)) or len(out) != 2:
        raise DataError(f"{spec} must return a pair (X, y), got {type(out).__name__} (--data)")
    try:
        x, y = (torch.as_tensor(np.asarray(v)) if not isinstance(v, torch.Tensor) else v for v in out)
    except Exception:
        raise DataError(f"{spec} must return tensors or arrays (X, y) (--data)") from None
    if x.dim() < 2:
        raise DataError(f"X must have a batch dimension and features, got shape {tuple(x.shape)}")
    if y.dim() != 1:
        raise DataError(f"y must be 1-d class labels, got shape {tuple(y.shape)}")
    if len(x) != len(y):
        raise DataError(f"X has {len(x)} rows but y has {len(y)} labels")
    if len(y) < 64:
        raise DataError(f"need at least 64 examples, got {len(y)}")
    if y.dtype == torch.bool or (y.dtype.is_floating_point and not torch.equal(y, y.round())):
        raise DataError(f"y must hold integer class labels, got dtype {y.dtype}")
    if not x.dtype.is_floating_point:
        x = x.float()
    if not torch.isfinite(x).all():
        raise DataError("X contains NaN or infinite values")
    return x.float().contiguous(), y.long().contiguous()


def _check_model_on_data(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> int:
    """Run the model on two examples; returns the number of classes. Shape and label errors
    here are the user's, reported in one line."""
    try:
        with torch.no_grad():
            out = model.eval()(x[:2])
    except Exception as e:
        raise DataError(f"the model cannot take X of shape {tuple(x.shape[1:])} per example: "
                        f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None
    finally:
        model.train()
    if not isinstance(out, torch.Tensor) or out.dim() != 2 or out.shape[0] != 2 or out.shape[1] < 2:
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise DataError(f"the model must map a batch of 2 examples to [2, n_classes] scores, "
                        f"got {shape}")
    c = int(out.shape[1])
    lo, hi = int(y.min()), int(y.max())
    if lo < 0 or hi >= c:
        raise DataError(f"labels must lie in [0, {c - 1}] for a model with {c} outputs, found "
                        f"[{lo}, {hi}]")
    return c


def tensor_data(x: torch.Tensor, y: torch.Tensor, n_classes: int, device: torch.device,
                seed: int = 0):
    """Resident TensorData: a seeded 10% (at most 5000) held out as the test set."""
    from batchlab.data import TensorData

    n = len(y)
    n_test = min(5000, max(1, n // 10))
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    te, tr = perm[:n_test].sort().values, perm[n_test:].sort().values
    h = hashlib.sha256(x.cpu().numpy().tobytes())
    h.update(y.cpu().numpy().tobytes())
    xtr, ytr = x[tr].to(device), y[tr].to(device)
    return TensorData(x_train=xtr, y_train=ytr,
                      eval_sets={"train": (xtr, ytr), "test": (x[te].to(device), y[te].to(device))},
                      input_dim=int(x[0].numel()), n_classes=n_classes, fingerprint=h.hexdigest())


# -- the recommendation ---------------------------------------------------------------------
def steps_model(b_crit: float, s0: float, b0: int, batch: float) -> float:
    """Steps to reach the measurement run's end point at batch B (anchored at S0 steps, B0)."""
    return s0 * (1 + b_crit / batch) / (1 + b_crit / b0)


def lr_rule_from_sweep(best: list[dict[str, Any]], b_crit: float) -> tuple[str, float, float, int]:
    """(rule, fitted slope, anchor lr, anchor batch) from tuned lrs at batch sizes <= B_crit
    (all reached ones if fewer than two lie below)."""
    pts = [(r["batch_size"], r["lr"]) for r in best if r["reached"]]
    below = [p for p in pts if p[0] <= b_crit] if b_crit else pts
    use = below if len(below) >= 2 else pts
    if len(use) < 2:
        b, lr = use[0] if use else (pts[0] if pts else (0, math.nan))
        return "constant (one tuned point)", 0.0, lr, b
    slope = float(np.polyfit(np.log([p[0] for p in use]), np.log([p[1] for p in use]), 1)[0])
    rule = min((("linear", 1.0), ("square-root", 0.5), ("constant", 0.0)),
               key=lambda r: abs(r[1] - slope))[0]
    b, lr = use[-1]
    return rule, slope, lr, b


def scale_lr(rule: str, lr: float, b_from: float, b_to: float) -> float:
    return lr * {"linear": b_to / b_from, "square-root": math.sqrt(b_to / b_from)}.get(rule, 1.0)


def recommend(model: nn.Module, td: Any, *, device: torch.device, base_batch: int = 128,
              base_lr: float = 0.1, epochs: int | None = None, thorough: bool = False,
              seed: int = 0, out_dir: Path | None = None, quiet: bool = False,
              model_name: str = "mlp", max_batch: int = 8192, store: Any = None) -> dict[str, Any]:
    """Measure and recommend (see the module docstring). Returns the JSON-able report."""
    from batchlab.analysis import throughput as tput
    from batchlab.cli import RichReporter
    from batchlab.config import make_config
    from batchlab.engine.train import train
    from batchlab.measure.noise import averaged, b_noise, b_simple, b_simple_two_batch, n_params
    from batchlab.probes.noise_scale import NoiseScaleProbe

    t_start = time.perf_counter()
    n = td.n_train
    b0 = min(base_batch, n)
    if epochs is None:
        epochs = max(1, min(10, round(50_000 / n)))
    steps_per_epoch = math.ceil(n / b0)
    probe = NoiseScaleProbe(every_steps=max(1, epochs * steps_per_epoch // 16), n_examples=512,
                            seed=seed)
    cfg = make_config(batch_size=b0, lr=base_lr, epochs=epochs, seed=seed, probes=[],
                      device=str(device))
    init_model = copy.deepcopy(model)
    res = train(cfg, model=model, data=td, probes=[probe],
                reporter=RichReporter(quiet, desc="measurement run"))
    if res.status != "completed":
        raise BatchlabError(f"the measurement run at batch {b0}, lr {base_lr} {res.status}; "
                            f"try a smaller --lr")
    net = res.model
    s0 = int(res.final["steps"])
    last = res.final

    # noise scale at the end of the measurement run
    gen = torch.Generator().manual_seed(seed + 1)
    perm = torch.randperm(n, generator=gen).to(td.x_train.device)
    n_ps = min(2048, n)
    xs, ys = td.x_train.index_select(0, perm[:n_ps]), td.y_train.index_select(0, perm[:n_ps])
    with _status(quiet, "B_simple (per-example gradients, bootstrap)"):
        est = b_simple(net, xs, ys, seed=seed)
    # B_simple over the second half of the run: mean tr(Sigma) / mean |G|^2 (noise.averaged)
    late = [(h["trace_sigma"], h["grad_sq"]) for h in probe.history if h["step"] >= s0 / 2]
    avg = averaged([*late, (est.trace_sigma, est.grad_sq)], seed=seed,
                   method=f"mean tr(Sigma) / mean |G|^2 over {len(late) + 1} iterates in steps "
                          f"{s0 // 2}..{s0}")
    b_big = max(b for b in (256, 512, 1024) if b <= n // 2) if n >= 512 else n // 2
    b_small = max(1, b_big // 16)
    with _status(quiet, "B_simple (two-batch estimator)"):
        two = b_simple_two_batch(net, td.x_train, td.y_train, b_small=b_small, b_big=b_big,
                                 n_batches=24, seed=seed)
    curv = None
    if n_params(net) <= 5_000_000:
        with _status(quiet, "B_noise (Hessian-vector products)"):
            nh = min(512, n - 32)
            curv = b_noise(net, td.x_train.index_select(0, perm[-32:]),
                           td.y_train.index_select(0, perm[-32:]),
                           td.x_train.index_select(0, perm[n_ps:n_ps + nh] if n > n_ps + nh
                                                   else perm[:nh]),
                           td.y_train.index_select(0, perm[n_ps:n_ps + nh] if n > n_ps + nh
                                                   else perm[:nh]))

    # throughput on this device
    grid = [2**k for k in range(4, 20) if 2**k <= min(n, max_batch)] or [min(16, n)]
    with _bar(quiet, "throughput") as cb:
        tp = tput.measure_stored(init_model, td.x_train, td.y_train, grid, store, progress=cb)

    # optional steps-to-target sweep
    sweep = None
    if thorough:
        sweep = _sweep(init_model, td, device, b0, base_lr, epochs, last.get("test_acc"), seed, quiet)

    # the recommendation
    if sweep and sweep.get("fit"):
        b_crit, source = sweep["fit"]["b_crit"], "steps-to-target fit"
    else:
        b_crit, source = avg.b_simple, "B_simple over the second half of the measurement run"
    if not math.isfinite(b_crit) or b_crit <= 0:
        b_crit, source = float(max(grid)), "B_simple not resolved (noise dominates): largest batch"
    ok = [r for r in tp if r.get("status") == "ok"]
    for r in ok:
        r["predicted_steps"] = steps_model(b_crit, s0, b0, r["batch_size"])
        r["predicted_seconds"] = r["predicted_steps"] * r["seconds_per_step"]
        r["examples_overhead"] = r["batch_size"] / b_crit  # E(B)/E_min - 1
    if not ok:
        raise BatchlabError("no batch size could be timed on this device (all out of memory)")
    best = min(ok, key=lambda r: r["predicted_seconds"])
    compute = [r for r in ok if r["batch_size"] <= 0.1 * b_crit]
    b_compute = max(compute, key=lambda r: r["batch_size"])["batch_size"] if compute else ok[0]["batch_size"]
    if sweep and sweep["best"]:
        rule, slope, lr_a, b_a = lr_rule_from_sweep(sweep["best"], b_crit)
        lr = scale_lr(rule, lr_a, b_a, best["batch_size"])
        lr_rule = (f"{rule} scaling (tuned-lr slope {slope:.2f} on log-log) from lr {lr_a:g} at "
                   f"batch {b_a}")
    else:
        lr = base_lr * (1 + b_crit / b0) / (1 + b_crit / best["batch_size"])
        lr_rule = (f"lr(B) = {base_lr:g} x (1 + B_crit/{b0}) / (1 + B_crit/B): linear below B_crit, "
                   f"constant above (McCandlish et al. eq. 2.7), anchored at the measurement run")

    hist = [{k: (v if math.isfinite(v) else None) for k, v in h.items()} for h in probe.history]
    report: dict[str, Any] = {
        "critical_batch_size": b_crit,
        "critical_batch_size_source": source,
        "recommended_batch_size": best["batch_size"],
        "recommended_batch_size_compute": b_compute,
        "recommended_lr": lr,
        "lr_rule": lr_rule,
        "predicted_steps": best["predicted_steps"],
        "predicted_seconds": best["predicted_seconds"],
        "target": (f"the training loss the measurement run reached ({last.get('train_loss'):.4g}; "
                   f"test acc {last.get('test_acc'):.4g})"),
        "noise_scale": {**avg.to_json(), "window_steps": [s0 // 2, s0],
                        "final_point": {**est.to_json(), "step": s0, "epoch": last.get("epoch"),
                                        "train_loss": last.get("train_loss")},
                        "history": hist, "two_batch": two.to_json(),
                        "b_noise": curv.to_json() if curv else None},
        "throughput": tp,
        "steps_to_target": sweep,
        "evidence": {
            "measurement_run": {"batch_size": b0, "lr": base_lr, "epochs": epochs, "steps": s0,
                                "train_loss": last.get("train_loss"),
                                "test_acc": last.get("test_acc"),
                                "train_seconds": last.get("train_seconds")},
            "model": model_name, "parameters": n_params(net), "n_train": n,
            "device": str(device), "threads": torch.get_num_threads(),
        },
    }
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        fig_path = out_dir / "recommend.png"
        _figure(report, fig_path)
        report["evidence"]["figure"] = str(fig_path)
        report["evidence"]["seconds"] = time.perf_counter() - t_start
        (out_dir / "recommend.json").write_text(json.dumps(_jsonable(report), indent=2))
    report["evidence"]["seconds"] = time.perf_counter() - t_start
    return _jsonable(report)


def _sweep(init_model: nn.Module, td: Any, device: torch.device, b0: int, lr0: float,
           epochs: int, target: float | None, seed: int, quiet: bool) -> dict[str, Any]:
    """A small steps-to-target sweep: 4 batch sizes x 3 lrs (centred on sqrt scaling), target =
    the test accuracy the measurement run reached, budget 2x its epochs."""
    from batchlab.analysis import scaling as stt
    from batchlab.config import make_config
    from batchlab.engine.train import train
    from batchlab.probes.noise_scale import TargetStepProbe

    if target is None:
        return {"best": [], "fit": None, "note": "no test accuracy to target"}
    n = td.n_train
    sizes = [b for b in (b0 // 4, b0, b0 * 4, b0 * 16) if 1 <= b <= n // 2]
    runs = []
    with _bar(quiet, "steps-to-target sweep") as cb:
        total = len(sizes) * 3
        for bs in sizes:
            for f in (1 / 3, 1.0, 3.0):
                lr = lr0 * math.sqrt(bs / b0) * f
                cfg = make_config(batch_size=bs, lr=lr, epochs=2 * epochs, seed=seed, probes=[],
                                  target_metric="test_acc", target_value=float(target),
                                  device=str(device))
                res = train(cfg, model=copy.deepcopy(init_model), data=td,
                            probes=[TargetStepProbe()])
                o = stt.outcome(res)
                runs.append({"batch_size": bs, "lr": lr, "seed": seed, "status": res.status,
                             "reached": o.reached, "steps_to_target": o.steps,
                             "examples_to_target": o.examples, "best_value": o.best,
                             "budget_steps": o.budget_steps})
                cb(len(runs), total)
    best = stt.best_per_batch(runs)
    reached = [r for r in best if r["reached"]]
    fit = None
    if len(reached) >= 2:
        fit = stt.fit_scaling([r["batch_size"] for r in reached],
                              [r["steps_to_target"] for r in reached])
    return {"target": f"test_acc >= {target:.4g}", "runs": runs, "best": best, "fit": fit}


def _jsonable(o: Any) -> Any:
    if isinstance(o, dict):
        return {str(k): _jsonable(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_jsonable(v) for v in o]
    if isinstance(o, (np.floating, np.integer)):
        o = o.item()
    if isinstance(o, float) and not math.isfinite(o):
        return None
    return o


class _status:
    """A transient spinner on stderr (nothing when quiet)."""

    def __init__(self, quiet: bool, text: str) -> None:
        self.cm = None if quiet else err.status(text)

    def __enter__(self) -> None:
        if self.cm:
            self.cm.__enter__()

    def __exit__(self, *exc: object) -> None:
        if self.cm:
            self.cm.__exit__(*exc)


class _bar:
    """A transient progress bar on stderr; yields a callback(done, total)."""

    def __init__(self, quiet: bool, text: str) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

        self.prog = None if quiet else Progress(TextColumn(f"[bold]{text}"), BarColumn(),
                                                MofNCompleteColumn(), console=err, transient=True)

    def __enter__(self):
        if self.prog is None:
            return lambda done, total: None
        self.prog.start()
        task = self.prog.add_task("", total=None)
        return lambda done, total: self.prog.update(task, completed=done, total=total)

    def __exit__(self, *exc: object) -> None:
        if self.prog:
            self.prog.stop()


def _figure(rep: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    h = [x for x in rep["noise_scale"]["history"] if x.get("b_simple") is not None]
    ax = axes[0]
    if h:
        st = [x["step"] if x["step"] is not None else math.nan for x in h]
        ax.semilogy(st, [x["b_simple"] for x in h], "o-", label="B_simple (probe, 512 ex.)")
        ax2 = ax.twinx()
        ax2.plot(st, [x["loss"] for x in h], "C2.--", label="loss")
        ax2.set_ylabel("loss on the probe sample", color="C2")
    ns = rep["noise_scale"]
    fp = ns["final_point"]
    if fp["b_simple"]:
        lo, hi = fp["ci"]
        ax.errorbar([fp["step"]], [fp["b_simple"]],
                    yerr=[[fp["b_simple"] - (lo or fp["b_simple"])], [(hi or fp["b_simple"]) - fp["b_simple"]]],
                    fmt="s", color="C3", label="B_simple at end, 2048 ex. (95% CI)")
    if ns["b_simple"]:
        ax.hlines(ns["b_simple"], *ns["window_steps"], color="C1", lw=3,
                  label=f"averaged over steps {ns['window_steps'][0]}..{ns['window_steps'][1]}")
    ax.set_xlabel("step of the measurement run")
    ax.set_ylabel("B_simple")
    ax.legend(fontsize=8, loc="upper left")
    ok = [r for r in rep["throughput"] if r.get("status") == "ok"]
    b = [r["batch_size"] for r in ok]
    axes[1].loglog(b, [r["samples_per_s"] for r in ok], "o-")
    axes[1].set_xlabel("batch size")
    axes[1].set_ylabel("samples / s (this device)")
    axes[2].loglog(b, [r["predicted_seconds"] for r in ok], "o-", label="predicted time")
    axes[2].axvline(rep["recommended_batch_size"], color="C1", ls=":",
                    label=f"recommended {rep['recommended_batch_size']}")
    axes[2].axvline(rep["critical_batch_size"], color="C3", ls="--",
                    label=f"B_crit {rep['critical_batch_size']:.3g}")
    axes[2].set_xlabel("batch size")
    axes[2].set_ylabel("seconds to the measurement run's loss")
    axes[2].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
