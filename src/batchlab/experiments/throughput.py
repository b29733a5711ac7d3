"""Throughput and memory vs batch size on the current device, and time to target.

A larger batch is cheaper per example only until the device saturates; past that, steps cost
proportionally more and only the steps saved (steps-to-target) still help. Samples/s is timed
on the engine `train()` uses (the fused SGD path for batchlab's MLPs, autograd + SGD for other
models) with resident data and `index_select` batches, after warm-up steps. Peak memory: on
CUDA `torch.cuda.max_memory_allocated`; on the CPU the growth of the process's peak RSS
(`ru_maxrss`) while that batch size ran, plus the peak itself (a peak only grows, so batch
sizes run in increasing order). An out-of-memory error at one batch size is recorded and the
grid goes on.

time-to-target(B) = steps-to-target(B) x seconds/step(B), with steps from the steps-to-target
sweep (through the store: run it first to reuse it) where measured and from its fitted
S(B) = S_min + E_min/B elsewhere.
"""

from __future__ import annotations

import math
import resource
import sys
import time
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from batchlab.experiments import Context, Experiment, Output
from batchlab.experiments import verdicts as V
from batchlab.experiments.claims import Claim
from batchlab.experiments.outputs import md_table


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


def is_oom(e: BaseException) -> bool:
    if isinstance(e, getattr(torch, "OutOfMemoryError", ())):
        return True
    msg = str(e).lower()
    return isinstance(e, RuntimeError) and ("out of memory" in msg or "can't allocate memory" in msg)


def measure(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_sizes: list[int], *,
            lr: float = 0.01, min_seconds: float = 0.3, max_steps: int = 200, warmup: int = 2,
            progress: Any = None) -> list[dict[str, Any]]:
    """Samples/s, s/step and peak memory per batch size for SGD steps on `model` (trained on a
    copy: the caller's weights are untouched). `progress(i, n)` is called after each size."""
    import copy

    from batchlab.engine.fused import FusedMLPSGD
    from batchlab.nn.models import MLP

    dev = x.device
    rows = []
    gen = torch.Generator().manual_seed(0)
    for i, bs in enumerate(sorted(batch_sizes)):
        net = copy.deepcopy(model).to(dev).train()
        fused = isinstance(net, MLP) and not any(
            isinstance(m, nn.modules.batchnorm._BatchNorm) for m in net.modules())
        row: dict[str, Any] = {"batch_size": bs, "engine": "fused" if fused else "autograd"}
        rss0 = _rss_mb() if _reset_peak_rss() else _peak_rss_mb()
        if dev.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(dev)
        try:
            if fused:
                stepper = FusedMLPSGD.from_mlps([net])

                def step(xb: torch.Tensor, yb: torch.Tensor, stepper=stepper) -> None:
                    stepper.step(xb.unsqueeze(0), yb.unsqueeze(0), lr)
            else:
                opt = torch.optim.SGD(net.parameters(), lr=lr)

                def step(xb: torch.Tensor, yb: torch.Tensor, net=net, opt=opt) -> None:
                    loss = F.cross_entropy(net(xb), yb)
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
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
            else:
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
    from batchlab.experiments.steps_to_target import predicted_steps

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


def figure(rows: list[dict[str, Any]]):
    import matplotlib.pyplot as plt

    ok = [r for r in rows if r.get("status") == "ok"]
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    b = [r["batch_size"] for r in ok]
    axes[0].loglog(b, [r["samples_per_s"] for r in ok], "o-")
    axes[0].set_ylabel("samples / s")
    axes[1].semilogx(b, [r.get("peak_memory_mb", math.nan) for r in ok], "o-")
    axes[1].set_ylabel("peak memory (MB; CPU: peak-RSS growth)")
    tt = [r for r in ok if r.get("time_to_target_s") is not None]
    if tt:
        axes[2].loglog([r["batch_size"] for r in tt], [r["time_to_target_s"] for r in tt], "o-")
        bst = best_for_time(rows)
        axes[2].axvline(bst["batch_size"], color="C1", ls=":", label=f"best B={bst['batch_size']}")
        axes[2].legend()
    axes[2].set_ylabel("predicted time to target (s)")
    for ax in axes:
        ax.set_xlabel("batch size")
    fig.tight_layout()
    return fig


POW2_PROBE = [255, 256, 257, 1023, 1024, 1025]


def throughput_claims(ok: list[dict[str, Any]], pow2: list[dict[str, Any]],
                      seeds: dict[int, dict[int, float]]) -> list[Claim]:
    """P1 (throughput and memory grow with the batch, then saturate), P2 (a time-optimal batch
    size between the extremes), P5 (powers of two faster), K6's cost half (a step's time grows
    ~ linearly in m once the hardware is saturated)."""
    b = [r["batch_size"] for r in ok]
    out = [Claim("throughput-grows", "P1", "samples/s grow with the batch size",
                 V.correlation(b, [r["samples_per_s"] for r in ok]), V.above(0.5),
                 "Spearman rho(batch size, samples/s) over the grid",
                 {"grid": [(r["batch_size"], r["samples_per_s"]) for r in ok]}, primary=True)]
    mem = [(r["batch_size"], r.get("peak_memory_mb")) for r in ok if r.get("peak_memory_mb")]
    if len(mem) >= 4:
        out.append(Claim("memory-grows", "P1", "memory grows with the batch size",
                         V.correlation([m[0] for m in mem], [m[1] for m in mem]), V.above(0.5),
                         "Spearman rho(batch size, peak memory growth)", {"grid": mem}, primary=False))
    big = [r for r in ok if r["batch_size"] >= 256]
    if len(big) >= 3:
        out.append(Claim("cost-linear-in-m", "K6", "once the hardware is saturated a step costs "
                         "O(m): time per step grows about linearly with the batch",
                         V.slope([math.log(r["batch_size"]) for r in big],
                                 [math.log(r["seconds_per_step"]) for r in big]), V.between(0.7, 1.3),
                         "slope of log(seconds per step) on log(batch size), batch >= 256",
                         {"grid": [(r["batch_size"], r["seconds_per_step"]) for r in big]},
                         reading="the O(m) cost half of K6", primary=False))
    per_sample: dict[int, list[float]] = {}
    for r in pow2:
        if r.get("status") == "ok":
            per_sample.setdefault(r["batch_size"], []).append(r["seconds_per_step"] / r["batch_size"])
    pairs = [(p, q) for p in (256, 1024) for q in (p - 1, p + 1) if p in per_sample and q in per_sample]
    others = [t for _, q in pairs for t in per_sample[q]]
    twos = [t for p, _ in pairs for t in per_sample[p]]
    out.append(Claim("powers-of-two-faster", "P5", "powers of two run faster per sample than "
                     "their neighbours (255/257, 1023/1025)", V.ratio(others, twos), V.above(1.05),
                     "time per sample of the neighbours / of the power of two (5% = a real gain)",
                     {k: float(np.mean(v)) for k, v in per_sample.items()}))
    times = []
    sec = {r["batch_size"]: r["seconds_per_step"] for r in ok}
    for st in seeds.values():
        tt = {bb: n * sec[bb] for bb, n in st.items() if bb in sec}
        if len(tt) >= 3:
            ks = sorted(tt)
            inner = min(tt[k] for k in ks[1:-1])
            times.append(inner / min(tt[ks[0]], tt[ks[-1]]))
    out.append(Claim("time-optimum-interior", "P2", "the batch size minimizing time to target "
                     "lies between the extremes", V.mean_interval(times), V.below(1.0),
                     "best time to target inside the grid / best at its two ends (per seed: "
                     "measured steps x measured seconds per step)", {"ratios": times}))
    return out


def run(ctx: Context) -> Output:
    from batchlab.engine.setup import build_model, get_data, resolve_device
    from batchlab.experiments import steps_to_target as stt

    s = stt.settings(ctx)
    extra = {"hidden": s["hidden"]} if "hidden" in s else {}
    cfg = ctx.config(**extra)
    dev = resolve_device(cfg.device)
    td = get_data(cfg, dev)
    grid = ctx.options.get("batch_sizes") or [2**k for k in range(4, 14)]
    grid = [b for b in grid if b <= td.n_train]
    model = build_model(cfg, td)
    tp = measure(model, td.x_train, td.y_train, grid)
    stt_rows, best, _ = stt.measure(ctx)
    reached = [r for r in best if r["reached"]]
    steps = {r["batch_size"]: r["steps_to_target"] for r in reached}
    fit = stt.fit_scaling(list(steps), list(steps.values())) if len(steps) >= 2 else None
    rows = time_to_target(tp, steps, fit)
    ok = [r for r in rows if r["status"] == "ok"]
    pow2 = [r for r in measure(model, td.x_train, td.y_train, POW2_PROBE * 3, min_seconds=0.1)
            if r["batch_size"] <= td.n_train]
    claims = throughput_claims(ok, pow2, stt.per_seed_steps(stt_rows, best))
    bst = best_for_time(rows)
    summary = [f"Device {dev}, {torch.get_num_threads()} threads. Timings on a shared machine "
               "are noisy.", "",
               md_table(rows, ["batch_size", "engine", "status", "samples_per_s",
                               "seconds_per_step", "peak_memory_mb", "steps_to_target",
                               "steps_source", "time_to_target_s"])]
    if bst:
        summary.append(f"Fastest to target: **batch {bst['batch_size']}** "
                       f"({bst['time_to_target_s']:.3g} s predicted).")
    oom = [r["batch_size"] for r in rows if r["status"] == "oom"]
    if oom:
        summary.append(f"Out of memory at batch sizes {oom} (recorded, skipped).")
    return Output(rows=rows, summary="\n".join(summary), claims=claims,
                  figures={"throughput.png": figure(rows)})


EXPERIMENT = Experiment("throughput", "Throughput, memory and time to target vs batch size", run)
