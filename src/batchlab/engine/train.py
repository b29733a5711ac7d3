"""The training engine: config -> run -> (optionally) store.

Hot-path rules: the dataset is resident on the device; batches are `index_select`s of a seeded
`randperm`; metrics accumulate on the device and are read once per epoch (no host sync inside
the step loop); evaluation of the full train and test sets runs in large chunks under
`no_grad`. Plain/momentum SGD on an MLP runs on the fused path (`fused.py`), everything else on
autograd with foreach optimizers.

A run is a function of its config and seed: the init, the shuffles and every step derive from
`seed` through dedicated generators.
"""

from __future__ import annotations

import math
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from batchlab.config import TrainConfig, make_config
from batchlab.data import TensorData, load_dataset, prepare
from batchlab.data.tensors import load_user
from batchlab.engine import schedules
from batchlab.engine.fused import FusedMLPSGD
from batchlab.errors import ConfigError
from batchlab.nn import factory
from batchlab.nn.checkpoint import load_state, save_state
from batchlab.nn.models import MLP
from batchlab.nn.optim import build_optimizer
from batchlab.probes import Probe, ProbeContext, make_probes
from batchlab.probes.geometry import snapshot
from batchlab.runs.store import RunRecord, Store


@dataclass
class TrainResult:
    run_id: str
    key: str
    config: TrainConfig
    status: str  # completed | diverged | failed
    epochs: list[dict[str, Any]]
    final: dict[str, Any]
    model: nn.Module | None = None
    init_state: dict[str, torch.Tensor] | None = None
    checkpoints: dict[int, dict[str, torch.Tensor]] = field(default_factory=dict)
    artifacts: dict[str, tuple[str, str]] = field(default_factory=dict)
    env: dict[str, Any] = field(default_factory=dict)
    wall_seconds: float = 0.0
    error: str | None = None
    cached: bool = False

    def checkpoint(self, epoch: int) -> dict[str, torch.Tensor]:
        """Weights saved at `epoch` (0 = init), from memory or the store's safetensors file."""
        if epoch in self.checkpoints:
            return self.checkpoints[epoch]
        name = f"epoch{epoch:04d}"
        if name in self.artifacts:
            return load_state(Path(self.artifacts[name][0]), sha256=self.artifacts[name][1])
        raise KeyError(f"run {self.run_id} has no checkpoint at epoch {epoch}; "
                       f"add it to checkpoint_epochs")

    def to_json(self) -> dict[str, Any]:
        return {
            "run_id": self.run_id,
            "status": self.status,
            "config": self.config.model_dump(mode="json"),
            "epochs": [clean(e) for e in self.epochs],
            "final": clean(self.final),
            "error": self.error,
            "cached": self.cached,
        }


class Reporter:
    """Progress callbacks (the CLI renders them with rich); all optional."""

    def start(self, cfg: TrainConfig, total_epochs: int) -> None: ...
    def steps(self, done: int, total: int) -> None: ...
    def epoch(self, metrics: dict[str, Any]) -> None: ...
    def finish(self) -> None: ...


def clean(d: dict[str, Any]) -> dict[str, Any]:
    """Non-finite floats -> None, so metrics are valid JSON."""
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in d.items()}


def resolve_device(spec: str = "auto") -> torch.device:
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(spec)
    except RuntimeError:
        raise ConfigError(f"unknown device {spec!r}; use auto, cpu or cuda[:N]") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {spec} requested but CUDA is not available")
    return dev


def environment(device: torch.device) -> dict[str, Any]:
    import batchlab

    env = {
        "batchlab": batchlab.__version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "platform": platform.platform(),
        "device": str(device),
        "threads": torch.get_num_threads(),
    }
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
    return env


_TD_CACHE: dict[tuple, TensorData] = {}


def get_data(cfg: TrainConfig, device: torch.device) -> TensorData:
    """Resident tensors for this config (memoized: a sweep prepares each variant once): the
    named dataset, or the user's loader (`cfg.data`), flattened for the built-in MLP."""
    raw = load_user(cfg.data, flat=cfg.model == "mlp") if cfg.data else load_dataset(cfg.dataset, cfg.data_dir)
    k = (raw.fingerprint, raw.x_train.shape[1:], cfg.normalize, cfg.val_fraction, cfg.max_train,
         cfg.max_test, str(device))
    if k not in _TD_CACHE:
        if len(_TD_CACHE) > 4:
            _TD_CACHE.clear()
        _TD_CACHE[k] = prepare(raw, normalize=cfg.normalize, val_fraction=cfg.val_fraction,
                               max_train=cfg.max_train, max_test=cfg.max_test, device=device)
    return _TD_CACHE[k]


def build_model(cfg: TrainConfig, data: TensorData) -> nn.Module:
    return factory.build_model(cfg, data)


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, chunk: int = 8192
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean NLL, accuracy) as 0-d device tensors; the model must return log-probabilities."""
    was = model.training
    model.eval()
    loss = torch.zeros((), device=x.device)
    correct = torch.zeros((), device=x.device)
    for xs, ys in zip(x.split(chunk), y.split(chunk)):
        out = model(xs)
        loss += F.nll_loss(out, ys, reduction="sum")
        correct += (out.argmax(1) == ys).sum()
    model.train(was)
    n = max(len(y), 1)
    return loss / n, correct / n


def use_fused(cfg: TrainConfig, model: nn.Module, probes: list[Probe]) -> bool:
    ok = (
        cfg.optimizer == "sgd"
        and isinstance(model, MLP)
        and not cfg.batchnorm
        and cfg.discard_fraction == 0
        and not any(p.needs_grad for p in probes)
    )
    if cfg.engine == "fused" and not ok:
        raise ConfigError("engine='fused' needs plain/momentum SGD on an MLP without batchnorm, "
                          "discarding or gradient probes")
    return ok and cfg.engine != "autograd"


def _shuffle_generator(seed: int) -> torch.Generator:
    # a stream distinct from the init generator (which uses `seed` itself)
    return torch.Generator().manual_seed(seed * 1_000_003 + 7919)


def train(
    config: TrainConfig | dict[str, Any],
    *,
    store: Store | str | Path | None = None,
    label: str | None = None,
    probes: list[Probe] | None = None,
    reporter: Reporter | None = None,
    model: nn.Module | None = None,
    data: TensorData | None = None,
    on_epoch: Callable[[dict[str, Any]], None] | None = None,
) -> TrainResult:
    """Train one run. With a store, a finished run with the same key is returned from the
    store instead of being recomputed (`result.cached`), and a new run is saved atomically.

    `model`/`data` let callers (user factories, `recommend`) supply their own module and
    tensors; then the key also covers the module's initial weights.
    """
    cfg = config if isinstance(config, TrainConfig) else make_config(**config)
    device = resolve_device(cfg.device)
    td = data if data is not None else get_data(cfg, device)
    for bs in cfg.batch_sizes():
        if bs > td.n_train:
            raise ConfigError(f"batch size {bs} is larger than the training set ({td.n_train})")
    probe_list = make_probes(cfg.probes) + list(probes or [])
    torch.manual_seed(cfg.seed)
    net = model if model is not None else build_model(cfg, td)
    net = net.to(device)
    key = cfg.key(factory.run_fingerprint(cfg, td, None if model is None and cfg.builtin_model else net))
    run_id = key[:12]

    st = Store(store) if isinstance(store, (str, Path)) else store
    if st is not None:
        rec = st.finished(key)
        if rec is not None:
            return TrainResult(run_id=rec.run_id, key=key, config=cfg, status=rec.status,
                               epochs=rec.epochs, final=rec.final, artifacts=rec.artifacts,
                               env=rec.env, wall_seconds=rec.wall_seconds or 0.0, cached=True)

    env = environment(device)
    t0 = time.perf_counter()
    result = TrainResult(run_id=run_id, key=key, config=cfg, status="completed", epochs=[],
                         final={}, model=net, env=env)
    try:
        _run(cfg, net, td, device, probe_list, reporter, result, on_epoch)
    except (ConfigError, KeyboardInterrupt):
        raise
    except Exception as e:  # a crash inside training is a result to keep, not to lose
        result.status = "failed"
        result.error = f"{type(e).__name__}: {e}"
        if st is not None:
            _save(st, result, label, t0)
        raise
    if st is not None:
        _save(st, result, label, t0)
    else:
        result.wall_seconds = time.perf_counter() - t0
    return result


def _save(st: Store, result: TrainResult, label: str | None, t0: float) -> None:
    from batchlab.data.idx import sha256_file

    artifacts = {}
    for epoch, state in result.checkpoints.items():
        path = st.artifacts_dir / result.run_id / f"epoch{epoch:04d}.safetensors"
        save_state(path, state, {"run_id": result.run_id, "epoch": epoch})
        artifacts[f"epoch{epoch:04d}"] = (str(path), sha256_file(path))
    result.artifacts = artifacts
    result.wall_seconds = time.perf_counter() - t0
    st.save_run(RunRecord(
        run_id=result.run_id, config_hash=result.key,
        config=result.config.model_dump(mode="json"), seed=result.config.seed,
        status=result.status, epochs=[clean(e) for e in result.epochs],
        final=clean(result.final), error=result.error, label=label,
        wall_seconds=result.wall_seconds, env=result.env, artifacts=artifacts,
    ))


def _metrics(model: nn.Module, td: TensorData) -> dict[str, torch.Tensor]:
    out = {}
    for name, (x, y) in td.eval_sets.items():
        loss, acc = evaluate(model, x, y)
        out[f"{name}_loss"], out[f"{name}_acc"] = loss, acc
    return out


def _target_hit(cfg: TrainConfig, m: dict[str, Any]) -> bool:
    if cfg.target_metric is None or m.get(cfg.target_metric) is None:
        return False
    v = m[cfg.target_metric]
    return v <= cfg.target_value if cfg.target_metric.endswith("loss") else v >= cfg.target_value


def _run(cfg: TrainConfig, net: nn.Module, td: TensorData, device: torch.device,
         probes: list[Probe], reporter: Reporter | None, result: TrainResult,
         on_epoch: Callable[[dict[str, Any]], None] | None) -> None:
    init_state = snapshot(net)
    result.init_state = init_state
    fused = use_fused(cfg, net, probes)
    stepper = (FusedMLPSGD.from_mlps([net], momentum=cfg.momentum, nesterov=cfg.nesterov,
                                     weight_decay=cfg.weight_decay) if fused else None)
    opt = None if fused else build_optimizer(cfg, net)
    ctx = ProbeContext(model=net, init_state=init_state, config=cfg, data=td, optimizer=opt)
    result.final["engine"] = "fused" if fused else "autograd"
    plan = schedules.epoch_plan(cfg)
    if reporter:
        reporter.start(cfg, len(plan))
    gen = _shuffle_generator(cfg.seed)
    X, Y, n = td.x_train, td.y_train, td.n_train
    want_ckpt = set(cfg.checkpoint_epochs)
    step_probes = [p for p in probes if p.every_steps]
    const_lr = schedules.constant_within_epoch(cfg)

    # epoch 0: the initial state
    row: dict[str, Any] = {"epoch": 0, "steps": 0, "samples": 0, "seconds": 0.0}
    t_eval = time.perf_counter()
    m0 = {k: float(v) for k, v in _metrics(net, td).items()}
    for p in probes:
        m0.update(p.on_start(ctx))
    row.update(m0)
    row["eval_seconds"] = time.perf_counter() - t_eval
    row["gap"] = row["train_acc"] - row["test_acc"]
    result.epochs.append(row)
    if 0 in want_ckpt:
        result.checkpoints[0] = snapshot(net)

    steps = samples = 0
    train_seconds = 0.0
    status = "completed"
    net.train()
    for ep in plan:
        bs = ep.batch_size
        n_steps = math.ceil(n / bs)
        perm = torch.randperm(n, generator=gen).to(device)
        running = torch.zeros((), device=device)
        report_every = max(1, n_steps // 50)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t_ep = time.perf_counter()
        lr = schedules.lr_at(cfg, ep, 0, n_steps)
        for s in range(n_steps):
            idx = perm[s * bs : (s + 1) * bs]
            xb, yb = X.index_select(0, idx), Y.index_select(0, idx)
            if not const_lr:
                lr = schedules.lr_at(cfg, ep, s, n_steps)
            if fused:
                loss = stepper.step(xb.unsqueeze(0), yb.unsqueeze(0), lr)[0]
            else:
                loss = _autograd_step(cfg, net, opt, xb, yb, lr, steps, step_probes, ctx)
            running += loss.detach() * len(idx)
            steps += 1
            samples += len(idx)
            if fused and step_probes:
                for p in step_probes:
                    if steps % p.every_steps == 0:
                        p.on_step(ctx, steps, xb, yb)
            if reporter and (s + 1) % report_every == 0:
                reporter.steps(s + 1, n_steps)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        ep_seconds = time.perf_counter() - t_ep
        train_seconds += ep_seconds
        t_eval = time.perf_counter()
        mt = _metrics(net, td)
        vals = torch.stack([running / n, *mt.values()]).tolist()  # the epoch's one host sync
        row = {"epoch": ep.epoch, "batch_size": bs, "lr": lr, "steps": steps, "samples": samples,
               "seconds": ep_seconds, "train_seconds_total": train_seconds,
               "running_loss": vals[0]}
        row.update(dict(zip(mt.keys(), vals[1:])))
        for p in probes:
            row.update(p.on_epoch_end(ctx, ep.epoch))
        row["gap"] = row["train_acc"] - row["test_acc"]
        row["eval_seconds"] = time.perf_counter() - t_eval
        result.epochs.append(row)
        if ep.epoch in want_ckpt:
            result.checkpoints[ep.epoch] = snapshot(net)
        if reporter:
            reporter.epoch(row)
        if on_epoch:
            on_epoch(row)
        if not all(math.isfinite(row[k]) for k in ("running_loss", "train_loss")):
            status = "diverged"
            result.final["diverged_epoch"] = ep.epoch
            break
        if _target_hit(cfg, row):
            result.final["target_epoch"] = ep.epoch
            result.final["target_steps"] = steps
            result.final["target_samples"] = samples
            break
    if reporter:
        reporter.finish()
    last = result.epochs[-1]
    result.status = status
    result.final.update({k: v for k, v in last.items() if isinstance(v, (int, float))})
    accs = [e["test_acc"] for e in result.epochs if isinstance(e.get("test_acc"), float)]
    result.final["best_test_acc"] = max((a for a in accs if math.isfinite(a)), default=None)
    result.final["train_seconds"] = train_seconds
    result.final["status"] = status
    if cfg.target_metric is not None:
        result.final["target_reached"] = "target_epoch" in result.final


def _autograd_step(cfg: TrainConfig, net: nn.Module, opt: torch.optim.Optimizer,
                   xb: torch.Tensor, yb: torch.Tensor, lr: float, step: int,
                   step_probes: list[Probe], ctx: ProbeContext) -> torch.Tensor:
    for g in opt.param_groups:
        g["lr"] = lr * g.get("lr_scale", 1.0)
    hook = getattr(opt, "on_step_begin", None)
    if hook is not None:
        hook(net, xb, yb, step)
    out = net(xb)
    if cfg.discard_fraction > 0:
        # drop the lowest-loss fraction of the batch before the update (keep at least one)
        per = F.nll_loss(out, yb, reduction="none")
        keep = max(1, int(round(len(yb) * (1 - cfg.discard_fraction))))
        loss = per.topk(keep).values.mean()
        reported = per.detach().mean()
    else:
        loss = F.nll_loss(out, yb)
        reported = loss
    opt.zero_grad(set_to_none=True)
    loss.backward()
    for p in step_probes:
        if (step + 1) % p.every_steps == 0:
            p.on_step(ctx, step + 1, xb, yb)
    opt.step()
    return reported
