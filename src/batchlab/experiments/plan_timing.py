"""The plan probe's one timing rule (`seconds_per_call`): how long a call takes on an idle machine,
measured on a machine that may not be idle. Kept apart from `plan_timer`, which decides what to
time, so the rule can be read (and changed) in one place."""

from __future__ import annotations

import math
import time
from collections.abc import Callable

import torch


def seconds_per_call(fn: Callable[[], object], device: torch.device, min_seconds: float,
           max_reps: int = 200, warmup: int = 2, blocks: int = 5) -> float:
    """Seconds per call on an idle machine, estimated in up to `blocks` timed blocks (about
    min_seconds in all), keeping the fastest. On a CPU a block's time is the smaller of its
    wall time and the process's CPU time over torch's threads: a thread that another job
    keeps off a core accrues no CPU time, so the CPU-time estimate does not grow with a
    sustained competing job (the wall time does: 6.9x under one here), and the fastest block
    drops a burst (the rule of Python's timeit). On a GPU it is the wall time (synchronized)."""
    for _ in range(warmup):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    threads = max(1, torch.get_num_threads())
    best, done, spent = math.inf, 0, 0.0
    while done < max_reps and spent < min_seconds:
        n, t0, c0 = 0, time.perf_counter(), time.process_time()
        while True:
            fn()
            n += 1
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            t = time.perf_counter() - t0
            if t >= min_seconds / blocks or done + n >= max_reps:
                break
        cpu = (time.process_time() - c0) / threads
        block = t if device.type == "cuda" else min(t, cpu)
        best, done, spent = min(best, block / n), done + n, spent + t
    return best
