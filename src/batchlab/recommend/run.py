"""`recommend`'s measurements, in order, and the report that ties them together.

1. a short SGD run at a reference batch size B0 and lr (the "measurement run") tracking
   B_simple with the noise-scale probe; at its end B_simple again on more examples with a
   bootstrap CI, the two-batch estimator on the same weights, and B_noise (HVPs) when the model
   is small enough;
2. throughput (s/step, memory) vs batch size on this device, through the store when one is
   given (measured once per device, model shape, batch size and engine);
3. the lr at B0 (`lr_search.py`): a line search in factors of 2 for the fewest steps to the
   measurement run's loss; its best (lr, steps) anchor the lr rule and the steps model;
4. with `thorough`, a small steps-to-target sweep (`sweep.py`) whose fit gives B_crit.

Without the sweep, B_crit is B_simple over the second half of the measurement run (mean
tr(Sigma) / mean |G|^2 over its probe points and the final one, as the paper averages; it grows
as training goes on, so later in training larger batches pay off more). `decide.py` turns these
into the recommendation. Progress goes to a plain callback `progress(stage, done, total)`
(`done`/`total` None: a stage without a count); the CLI renders it.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from batchlab.analysis.throughput import measure_stored
from batchlab.atomic import atomic_path, atomic_write, jsonable, to_json
from batchlab.config import TrainConfig, make_config
from batchlab.data.stream import sample_data
from batchlab.engine.result import Reporter
from batchlab.errors import BatchlabError, ConfigError
from batchlab.measure.noise import averaged, b_simple, default_loss, n_params
from batchlab.measure.noise_curvature import b_noise
from batchlab.measure.noise_two_batch import b_simple_two_batch
from batchlab.probes.noise_scale import NoiseScaleProbe
from batchlab.recommend.decide import critical_batch, decide
from batchlab.recommend.figure import figure
from batchlab.recommend.lr_search import search_lr
from batchlab.recommend.sweep import small_sweep
from batchlab.runs.training import train
from batchlab.task import Classification, Objective, loss_field, objective_for

Progress = Callable[[str, "int | None", "int | None"], None]
MAX_EPOCHS = 10_000
POOL_EXAMPLES = 4096
"""Examples drawn from a streamed data set for the noise-scale, curvature and throughput
measurements (the measurement run itself streams the whole set)."""
RECOMMEND_OPTIMIZERS = ("sgd", "adam", "adamw")
OPTIMIZER_NOTES = {
    "sgd": "plain SGD: every run and timing used it; the lr rule is McCandlish et al.'s for SGD",
    "adam": ("Adam: every run and timing used it; B_simple is a property of the gradient noise "
             "(optimizer-free), measured along Adam's trajectory; the lr follows square-root "
             "scaling, the rule for adaptive methods (Malladi et al., 2022), up to B_crit"),
    "adamw": ("AdamW: every run and timing used it; B_simple is a property of the gradient noise "
              "(optimizer-free), measured along AdamW's trajectory; the lr follows square-root "
              "scaling, the rule for adaptive methods (Malladi et al., 2022), up to B_crit"),
}


class _RunProgress(Reporter):
    """The measurement run's engine callbacks as `progress("measurement run", done, total)`
    in steps over the whole run."""

    def __init__(self, progress: Progress) -> None:
        self.progress = progress
        self.epochs_total = self.epochs_done = 0

    def start(self, cfg: TrainConfig, total_epochs: int) -> None:
        self.epochs_total, self.epochs_done = total_epochs, 0
        self.progress("measurement run", 0, total_epochs)

    def epoch(self, metrics: dict[str, Any]) -> None:
        self.epochs_done += 1
        self.progress("measurement run", self.epochs_done, self.epochs_total)


def two_batch_sizes(n: int) -> tuple[int, int] | None:
    """(B_small, B_big) for the two-batch estimator: B_big the largest power of two up to 1024
    and n/2, B_small = B_big/16 (at least 1); None when n is too small for two batch sizes."""
    if n < 4:
        return None
    b_big = 1 << min(10, (n // 2).bit_length() - 1)
    return max(1, b_big // 16), b_big


def check_settings(*, base_batch: int, base_lr: float, epochs: int | None, max_batch: int,
                   seed: int, n: int) -> None:
    """One-line errors for settings no measurement can come from (before any work starts)."""
    if epochs is not None and not 1 <= epochs <= MAX_EPOCHS:
        raise ConfigError(f"--epochs must be between 1 and {MAX_EPOCHS}, got {epochs}")
    if base_batch < 1 or max_batch < 1:
        raise ConfigError("--batch-size and --max-batch must be positive")
    if not (math.isfinite(base_lr) and 0 < base_lr <= 1e3):
        raise ConfigError(f"--lr must be a positive number up to 1000, got {base_lr}")
    from batchlab.config import MAX_SEED  # train's bound: the same seeds work everywhere

    if not 0 <= seed <= MAX_SEED:
        raise ConfigError(f"--seed must be between 0 and {MAX_SEED}, got {seed}")
    if n < 4:
        raise BatchlabError(f"need at least 4 training examples to measure a noise scale, got {n}")
    if base_batch > n:
        raise ConfigError(f"--batch-size {base_batch} exceeds the {n} training examples")


def recommend(model: nn.Module, td: Any, *, device: torch.device, base_batch: int = 128,
              base_lr: float = 0.1, epochs: int | None = None, thorough: bool = False,
              seed: int = 0, out_dir: Path | None = None, progress: Progress | None = None,
              model_name: str = "mlp", max_batch: int = 8192, store: Any = None,
              tune_lr: bool = True, optimizer: str = "sgd", objective: Objective | str | None = None,
              amp: str = "off") -> dict[str, Any]:
    """Measure and recommend (see the module docstring). Returns the JSON-able report.
    `store` (a `batchlab.runs.store.Store`) keeps the throughput points.

    `td`: resident TensorData, or StreamData (never loaded whole: the measurement run streams
    it; the noise-scale, curvature and throughput measurements use a bounded pool of
    `POOL_EXAMPLES` examples drawn from it). `optimizer` (sgd, adam, adamw), `objective` (the
    loss; classification when None) and `amp` are those of every run and timing; the report
    states the optimizer it assumed and the lr rule that goes with it."""
    if optimizer not in RECOMMEND_OPTIMIZERS:
        raise ConfigError(f"--optimizer must be one of {', '.join(RECOMMEND_OPTIMIZERS)}, got "
                          f"{optimizer!r}")
    obj = objective_for(objective)
    loss_fn = default_loss if isinstance(obj, Classification) else obj
    # a loss object travels to train() as itself; a name travels in the config
    run_loss = None if objective is None or isinstance(objective, str) else obj
    fields = {"optimizer": optimizer, "amp": amp, "loss": loss_field(objective)}
    streamed = bool(getattr(td, "streamed", False))
    n = td.n_train
    check_settings(base_batch=base_batch, base_lr=base_lr, epochs=epochs, max_batch=max_batch,
                   seed=seed, n=n if n is not None else max(base_batch, 4))
    say = progress or (lambda stage, done, total: None)
    t_start = time.perf_counter()
    b0 = base_batch
    if epochs is None:
        epochs = max(1, min(10, round(50_000 / n))) if n else 1
    steps_per_epoch = math.ceil(n / b0) if n else None
    probe = NoiseScaleProbe(every_steps=max(1, epochs * steps_per_epoch // 16) if steps_per_epoch else 25,
                            n_examples=min(512, n or 512), seed=seed)
    cfg = make_config(batch_size=b0, lr=base_lr, epochs=epochs, seed=seed, probes=[],
                      device=str(device), **fields)
    init_model = copy.deepcopy(model)
    res = train(cfg, model=model, data=td, probes=[probe], reporter=_RunProgress(say), loss=run_loss)
    if res.status != "completed":  # no lr trains weights that are NaN from the start
        nan0 = not all(bool(p.isfinite().all()) for p in init_model.parameters())
        raise BatchlabError(f"the measurement run at batch {b0}, lr {base_lr:g} {res.status}; "
                            f"{'the model holds NaN or inf weights' if nan0 else 'try a smaller --lr'}")
    net, last = res.model, res.final
    s0 = int(last["steps"])
    if n is None:  # a stream of unknown length: its length is what the measurement run saw
        n = int(last["samples"]) // epochs

    # the examples the measurements use: resident data itself, or a bounded pool of a stream
    if streamed:
        say(f"drawing {POOL_EXAMPLES} examples from the stream", None, None)
        X, Y = sample_data(td, POOL_EXAMPLES, seed + 1, device)
        n_pool = len(Y)
    else:
        X, Y, n_pool = td.x_train, td.y_train, n

    # noise scale at the end of the measurement run
    gen = torch.Generator().manual_seed(seed + 1)
    perm = torch.randperm(n_pool, generator=gen).to(X.device)
    n_ps = min(2048, n_pool)
    xs, ys = X.index_select(0, perm[:n_ps]), Y.index_select(0, perm[:n_ps])
    say("B_simple (per-example gradients, bootstrap)", None, None)
    est = b_simple(net, xs, ys, seed=seed, loss_fn=loss_fn)
    # late probe points; a non-finite one (an overflowing step) would make the average NaN
    late = [(h["trace_sigma"], h["grad_sq"]) for h in probe.history if h["step"] >= s0 / 2
            and math.isfinite(h["trace_sigma"]) and math.isfinite(h["grad_sq"])]
    avg = averaged([*late, (est.trace_sigma, est.grad_sq)], seed=seed,
                   method=f"mean tr(Sigma) / mean |G|^2 over {len(late) + 1} iterates in steps "
                          f"{s0 // 2}..{s0}")
    two = None
    sizes = two_batch_sizes(n_pool)
    if sizes is not None:
        say("B_simple (two-batch estimator)", None, None)
        two = b_simple_two_batch(net, X, Y, b_small=sizes[0], b_big=sizes[1],
                                 n_batches=24, seed=seed, loss_fn=loss_fn)
    curv = None
    if n_params(net) <= 5_000_000 and n_pool >= 64:
        say("B_noise (Hessian-vector products)", None, None)
        h_idx = perm[-32:]
        g_idx = perm[n_ps:n_ps + 512] if n_pool >= n_ps + 512 + 32 else perm[: min(512, n_pool - 32)]
        curv = b_noise(net, X.index_select(0, h_idx), Y.index_select(0, h_idx),
                       X.index_select(0, g_idx), Y.index_select(0, g_idx), loss_fn=loss_fn)

    # throughput on this device (the run's optimizer, loss and amp; batches drawn from X)
    grid = [2**k for k in range(4, 20) if 2**k <= min(n, max_batch)] or [min(16, n, max_batch)]
    tp = measure_stored(init_model, X, Y, grid, store,
                        progress=lambda d, t: say("throughput", d, t),
                        optimizer=optimizer, amp=amp,
                        objective=None if isinstance(obj, Classification) else obj)

    # the lr at B0: a line search to the measurement run's loss (see lr_search.py)
    search = None
    lr_star, s_star = base_lr, s0
    if tune_lr:
        search = search_lr(init_model, td, device, b0=b0, lr0=base_lr, s0=s0,
                           target_loss=float(last["train_loss"]), seed=seed, progress=progress,
                           stage=f"lr search at batch {b0}", fields=fields, loss=run_loss, n_train=n)
        lr_star, s_star = search["lr"], search["steps"]

    sweep = None
    if thorough:
        sweep = small_sweep(init_model, td, device, b0, base_lr, epochs,
                            last.get(f"test_{obj.metric_name}"), seed, progress, fields=fields,
                            loss=run_loss, n_train=n, higher_is_better=obj.higher_is_better)
    b_crit, source = critical_batch(sweep.get("fit") if sweep else None, avg.b_simple,
                                    max(grid))
    rec = decide(tp, b_crit=b_crit, s0=s_star, b0=b0, base_lr=lr_star,
                 tuned=sweep["best"] if sweep else None, optimizer=optimizer)
    # the rule's lr is a starting point: the same line search at the recommended batch size
    # (cheap: it is the fastest batch size by the model), to the same loss
    b_rec = rec["recommended_batch_size"]
    at_rec = None
    if tune_lr:
        at_rec = search if b_rec == b0 else search_lr(
            init_model, td, device, b0=b_rec, lr0=rec["recommended_lr"],
            target_loss=float(last["train_loss"]), seed=seed, progress=progress,
            budget_steps=math.ceil(2 * rec["predicted_steps"]), stage=f"lr search at batch {b_rec}",
            fields=fields, loss=run_loss, n_train=n)
        if at_rec["steps"] is not None:
            rec["lr_rule"] += (f"; then the fewest steps in a line search (factors of 2) at "
                               f"batch {b_rec}" if at_rec["lr"] != rec["recommended_lr"] else
                               f"; confirmed by a line search at batch {b_rec}")
            rec["recommended_lr"] = at_rec["lr"]
            rec["measured_steps"] = at_rec["steps"]

    hist = [{k: (v if math.isfinite(v) else None) for k, v in h.items()} for h in probe.history]
    m = obj.metric_name
    report: dict[str, Any] = {
        "critical_batch_size": b_crit,
        "critical_batch_size_source": source,
        **rec,
        "optimizer": optimizer,
        "optimizer_note": OPTIMIZER_NOTES[optimizer],
        "loss": obj.name, "metric": m, "amp": amp,
        "target": (f"the training loss the measurement run reached ({last.get('train_loss'):.4g}; "
                   f"test {m} {last.get(f'test_{m}'):.4g})"),
        "noise_scale": {**avg.to_json(), "window_steps": [s0 // 2, s0],
                        "final_point": {**est.to_json(), "step": s0, "epoch": last.get("epoch"),
                                        "train_loss": last.get("train_loss")},
                        "history": hist, "two_batch": two.to_json() if two else None,
                        "b_noise": curv.to_json() if curv else None},
        "throughput": tp,
        "lr_search": search,
        "lr_search_at_recommended": at_rec,
        "steps_to_target": sweep,
        "evidence": {
            "measurement_run": {"batch_size": b0, "lr": base_lr, "epochs": epochs, "steps": s0,
                                "optimizer": optimizer, "amp": amp,
                                "train_loss": last.get("train_loss"),
                                f"test_{m}": last.get(f"test_{m}"),
                                "train_seconds": last.get("train_seconds")},
            "model": model_name, "parameters": n_params(net), "n_train": n,
            "data": ({"streamed": True, "identity": td.identity, "pool_examples": n_pool,
                      "fingerprint": td.fingerprint} if streamed else {"streamed": False}),
            "device": str(device), "threads": torch.get_num_threads(),
        },
    }
    if out_dir is not None:
        say("figure", None, None)
        out_dir.mkdir(parents=True, exist_ok=True)
        fig_path = out_dir / "recommend.png"
        with atomic_path(fig_path) as tmp:
            figure(report, tmp)
        report["evidence"]["figure"] = str(fig_path)
        report["evidence"]["seconds"] = time.perf_counter() - t_start
        atomic_write(out_dir / "recommend.json", to_json(report, indent=2))
    report["evidence"]["seconds"] = time.perf_counter() - t_start
    return jsonable(report)
