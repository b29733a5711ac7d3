"""Throughput and memory vs batch size on the current device, stored so it is measured once.

A larger batch is cheaper per example only until the device saturates; past that, steps cost
proportionally more and only the steps saved (steps-to-target) still help. Samples/s is timed
on the stepper `train()` builds for the run (`engine.steppers.make_stepper`, of the kind
`engine.choice.choose_engine` names: fused SGD for batchlab's MLPs, autograd with the run's
optimizer, loss and amp otherwise) with resident data and `index_select` batches, after
warm-up steps. Peak memory: on
CUDA `torch.cuda.max_memory_allocated`; on the CPU the growth of the process's peak RSS
(`ru_maxrss`) while that batch size ran, plus the peak itself (a peak only grows, so batch
sizes run in increasing order). An out-of-memory error at one batch size is recorded and the
grid goes on.

`measure_stored` keeps every point in the results store (its checksummed `measurements` table,
kind "throughput"), keyed by what changes it: the device
(its name and thread count), the model's shape (its module tree and parameter shapes; not its
weights), the batch size, the engine (with the optimizer, amp and loss when they are not plain
SGD, full precision and cross-entropy: `recommend --optimizer adam` times Adam's steps) and the
torch version. `recommend`, the throughput
experiment and the recommend-accuracy benchmark share those points instead of re-timing.

time-to-target(B) = steps-to-target(B) x seconds/step(B), with steps measured where there are
measurements and from a fitted S(B) = S_min + E_min/B elsewhere.
"""

from __future__ import annotations

import copy
import hashlib
import json
import platform
import resource
import sys
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from batchlab.analysis.scaling import predicted_steps
from batchlab.config import TrainConfig, make_config
from batchlab.engine import steppers
from batchlab.engine.choice import choose_engine
from batchlab.runs.measurements import Measurements
from batchlab.runs.store import Store
from batchlab.task import objective_for

Progress = Callable[[int, int], None]

KIND = "throughput"
"""The `measurements` kind of a stored timing point (`batchlab.runs.measurements`)."""
LEGACY_TABLE = "throughput"
"""The table older stores kept timing points in (raw JSON rows, no checksum). It is read, never
written: a point found only there is copied into `measurements` (checksummed) the first time
it is asked for, and the old row stays where it was, so nothing stored is lost."""


def timing_config(optimizer: str = "sgd", amp: str = "off", lr: float = 0.01) -> TrainConfig:
    """The config of a timed step: the run's optimizer and amp at their default settings, no
    momentum or weight decay (a step's cost hardly depends on them; the stored keys never
    carried them)."""
    return make_config(optimizer=optimizer, amp=amp, lr=lr, momentum=0.0, weight_decay=0.0)


def engine_for(model: nn.Module, optimizer: str = "sgd", amp: str = "off",
               objective: Any = None) -> str:
    """The engine `train()` would use on this model (`choose_engine`: "fused" for plain SGD
    on batchlab's MLPs with the classification loss, else "autograd"), suffixed with the
    optimizer, amp and loss where they are not the defaults (they change a step's cost, so
    they key its timing)."""
    choice = choose_engine(timing_config(optimizer, amp), model=model,
                           loss_object=objective is not None)
    if choice.fused:
        return "fused"
    extra = [v for v in (optimizer if optimizer != "sgd" else None,
                         f"amp-{amp}" if amp != "off" else None,
                         _objective_id(objective)) if v]
    return "+".join(["autograd", *extra])


def _objective_id(objective: Any) -> str | None:
    if objective is None:
        return None
    from batchlab.task import loss_field

    return f"loss-{loss_field(objective)}"


def device_signature(device: torch.device) -> str:
    """What makes a timing on this device comparable: the processor and the threads used."""
    if device.type == "cuda":
        return f"cuda:{torch.cuda.get_device_name(device)}"
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        pass
    return f"cpu:{cpu}:threads={torch.get_num_threads()}"


def model_signature(model: nn.Module, input_shape: tuple[int, ...]) -> str:
    """A hash of the module tree, parameter shapes and per-example input shape (not weights:
    the time of a step does not depend on their values)."""
    h = hashlib.sha256(repr(model).encode())
    for name, p in model.named_parameters():
        h.update(f"{name}:{tuple(p.shape)}:{p.dtype}".encode())
    h.update(repr(tuple(input_shape)).encode())
    return h.hexdigest()[:24]


def point_spec(device_sig: str, model_sig: str, batch_size: int, engine: str,
               replicate: int = 0) -> dict[str, Any]:
    """What a timing point depends on: its `measurements` spec (`replicate` only when > 0)."""
    spec: dict[str, Any] = {"device": device_sig, "model": model_sig, "batch_size": batch_size,
                            "engine": engine, "torch": torch.__version__}
    if replicate:
        spec["replicate"] = replicate
    return spec


def legacy_key(device_sig: str, model_sig: str, batch_size: int, engine: str,
               replicate: int = 0) -> str:
    """The key a point had in the legacy `throughput` table."""
    parts: list[Any] = [device_sig, model_sig, batch_size, engine, torch.__version__]
    payload = json.dumps(parts + [replicate] if replicate else parts)
    return hashlib.sha256(payload.encode()).hexdigest()


def _legacy_row(store: Store, key: str) -> dict[str, Any] | None:
    """A point of the legacy table, or None (also when the store never had that table)."""
    has_table = store.conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND "
                                   "name = ?", (LEGACY_TABLE,)).fetchone()
    if has_table is None:
        return None
    row = store.conn.execute(f"SELECT row_json FROM {LEGACY_TABLE} WHERE key = ?",
                             (key,)).fetchone()
    return None if row is None else json.loads(row[0])


def measure_stored(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_sizes: list[int],
                   store: Store | None, *, progress: Progress | None = None,
                   replicate: int = 0, **kw: Any) -> list[dict[str, Any]]:
    """`measure`, but each (device, model shape, batch size, engine) point is read from the
    store's checksummed `measurements` table when it is there and written to it when it is
    measured (a point of an older store's `throughput` table is moved over on first use).
    Rows carry `cached`. `replicate` > 0 keys an independent repetition of the timing (the
    throughput experiment times the grid once per seed, so timing noise is in its intervals);
    0 is the shared one."""
    if store is None:
        return measure(model, x, y, batch_sizes, progress=progress, **kw)
    meas = Measurements(store)
    dev_sig = device_signature(x.device)
    m_sig = model_signature(model, tuple(x.shape[1:]))
    engine = engine_for(model, kw.get("optimizer", "sgd"), kw.get("amp", "off"),
                        kw.get("objective"))
    sizes = sorted(batch_sizes)

    def spec(bs: int) -> dict[str, Any]:
        return point_spec(dev_sig, m_sig, bs, engine, replicate)

    have: dict[int, dict[str, Any]] = {}
    for bs in sizes:
        got = meas.get(KIND, spec(bs))
        if got is None:
            got = _legacy_row(store, legacy_key(dev_sig, m_sig, bs, engine, replicate))
            if got is not None:  # an older store's point: checksummed from now on
                meas.put(KIND, spec(bs), got)
        if got is not None:
            have[bs] = {**got, "cached": True}
    todo = [b for b in sizes if b not in have]
    done = len(have)

    def prog(i: int, n: int) -> None:
        if progress:
            progress(done + i, len(sizes))

    if progress:
        progress(done, len(sizes))
    for r in measure(model, x, y, todo, progress=prog, **kw) if todo else []:
        meas.put(KIND, spec(r["batch_size"]), r)
        have[r["batch_size"]] = {**r, "cached": False}
    return [have[b] for b in sizes]


def _proc_status_mb(field: str) -> float | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    return None


def _reset_peak_rss() -> bool:
    """Linux: writing 5 to /proc/self/clear_refs resets the peak RSS (VmHWM), so each batch
    size gets its own peak. Elsewhere the lifetime peak (ru_maxrss) is all there is."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _rss_mb() -> float:
    cur = _proc_status_mb("VmRSS")
    return cur if cur is not None else _peak_rss_mb()


def _peak_rss_mb() -> float:
    hwm = _proc_status_mb("VmHWM")
    if hwm is not None:
        return hwm
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r / (1 << 20) if sys.platform == "darwin" else r / 1024  # bytes on macOS, KiB else


MEMORY_CUDA = "torch.cuda.max_memory_allocated after a reset of the peak"
MEMORY_RSS = "growth of the process's peak RSS (VmHWM) after a reset through /proc/self/clear_refs"
MEMORY_LIFETIME = ("growth of the lifetime peak RSS (ru_maxrss; no reset possible: a size below "
                   "an earlier peak shows 0)")


def is_oom(e: BaseException) -> bool:
    if isinstance(e, getattr(torch, "OutOfMemoryError", ())):
        return True
    msg = str(e).lower()
    return isinstance(e, RuntimeError) and ("out of memory" in msg or "can't allocate memory" in msg)


def measure(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_sizes: list[int], *,
            lr: float = 0.01, min_seconds: float = 0.3, max_steps: int = 200, warmup: int = 2,
            progress: Any = None, optimizer: str = "sgd", amp: str = "off",
            objective: Any = None) -> list[dict[str, Any]]:
    """Samples/s, s/step and peak memory per batch size for steps on `model` (trained on a
    copy: the caller's weights are untouched). `progress(i, n)` is called after each size.
    `optimizer` (sgd, adam, adamw), `amp` (off, bf16, fp16) and `objective` (a
    `batchlab.task` loss; None: the classification NLL the engine trains with) make the timed
    step the one a run would take: it is the step of the stepper a run builds."""
    cfg = timing_config(optimizer, amp, lr)
    loss = None if objective is None else objective_for(objective)
    dev = x.device
    rows = []
    gen = torch.Generator().manual_seed(0)
    for i, bs in enumerate(sorted(batch_sizes)):
        net = copy.deepcopy(model).to(dev).train()
        engine = engine_for(net, optimizer, amp, objective)
        row: dict[str, Any] = {"batch_size": bs, "engine": engine}
        reset = _reset_peak_rss()
        rss0 = _rss_mb() if reset else _peak_rss_mb()
        if dev.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(dev)
        try:
            # the stepper a run of this config builds (fused or autograd, its loss and amp)
            stepper = steppers.make_stepper([cfg], [net], [[]], objective=loss)

            def step(xb: torch.Tensor, yb: torch.Tensor, stepper=stepper) -> None:
                stepper.step(xb.unsqueeze(0), yb.unsqueeze(0), (lr,))
            n = len(y)
            steps, t = 0, 0.0
            for s in range(warmup + max_steps):
                idx = torch.randint(0, n, (bs,), generator=gen).to(dev)
                if s == warmup:
                    if dev.type == "cuda":
                        torch.cuda.synchronize(dev)
                    t0 = time.perf_counter()
                step(x.index_select(0, idx), y.index_select(0, idx))
                if s >= warmup:
                    steps += 1
                    if dev.type == "cuda" and steps % 10 == 0:
                        torch.cuda.synchronize(dev)
                    t = time.perf_counter() - t0
                    if t >= min_seconds and steps >= 3:
                        break
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
                t = time.perf_counter() - t0
            row.update(status="ok", steps=steps, seconds_per_step=t / steps,
                       samples_per_s=bs * steps / t)
            if dev.type == "cuda":
                row["peak_memory_mb"] = torch.cuda.max_memory_allocated(dev) / 2**20
                row["memory_method"] = MEMORY_CUDA
            else:
                row["memory_method"] = MEMORY_RSS if reset else MEMORY_LIFETIME
                row["peak_rss_mb"] = _peak_rss_mb()
                row["peak_memory_mb"] = max(0.0, row["peak_rss_mb"] - rss0)  # this size's need
        except Exception as e:  # OOM is a result to record; anything else is re-raised
            if not is_oom(e):
                raise
            row.update(status="oom", error=str(e).splitlines()[0][:200])
            if dev.type == "cuda":
                torch.cuda.empty_cache()
        finally:
            del net
        rows.append(row)
        if progress:
            progress(i + 1, len(batch_sizes))
    return rows


def time_to_target(tp: list[dict[str, Any]], steps: dict[int, float],
                   fit: dict[str, float] | None) -> list[dict[str, Any]]:
    """Attach steps (measured, else fitted) and predicted seconds to each throughput row."""
    out = []
    for r in tp:
        r = dict(r)
        b = r["batch_size"]
        if b in steps:
            r["steps_to_target"], r["steps_source"] = steps[b], "measured"
        elif fit:
            r["steps_to_target"], r["steps_source"] = predicted_steps(fit, b), "fit"
        if r.get("status") == "ok" and r.get("steps_to_target") is not None:
            r["time_to_target_s"] = r["steps_to_target"] * r["seconds_per_step"]
        out.append(r)
    return out


def best_for_time(rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    ok = [r for r in rows if r.get("time_to_target_s") is not None]
    return min(ok, key=lambda r: r["time_to_target_s"]) if ok else None
