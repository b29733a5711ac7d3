"""The throughput probe behind `--plan`: short timings on this device, memoized per shape.

Each timing runs the code the real work runs (the stepper `engine.steppers.make_stepper` builds
for the engine `engine.choice.choose_engine` picks: fused SGD for K stacked MLPs, or autograd
with the run's optimizer where the run cannot use it; a gradient trial through
`run_trial_block` on one thread; a Hessian-vector product through the curvature module), after
a warm-up, for about
`min_seconds` in a few blocks, keeping the fastest block, each block timed by the smaller of
its wall time and its CPU time per thread (so another job on the CPU does not inflate it).
Small shapes are timed directly; nothing is extrapolated from FLOP counts.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence

import torch

from batchlab.config import TrainConfig, make_config
from batchlab.engine.choice import EngineChoice, EngineKind, choose_engine
from batchlab.engine.steppers import make_stepper
from batchlab.nn.models import build_mlp
from batchlab.runs.tasks import threads

PROBE_STEPS = 64  # steps of a timed gradient-trial pass (the per-step cost does not depend on n)


def mlp_params(dims: Sequence[int]) -> int:
    return sum(a * b + b for a, b in zip(dims[:-1], dims[1:]))


def _step_config(cfg: TrainConfig, dims: Sequence[int], kind: EngineKind) -> TrainConfig:
    """The config of a timed step of `cfg`: its optimizer settings and amp on an MLP of
    `dims`, forced onto the engine `cfg` trains on (its loss, probes and data are not timed:
    the probe's batches are random classification batches)."""
    return make_config(hidden=list(dims[1:-1]), lr=1e-3, engine=kind, optimizer=cfg.optimizer,
                       momentum=cfg.momentum, nesterov=cfg.nesterov,
                       weight_decay=cfg.weight_decay, betas=cfg.betas, eps=cfg.eps,
                       amp=cfg.amp)


def _timed(fn: Callable[[], object], device: torch.device, min_seconds: float,
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


class Probe:
    """Memoized timings. `threads`: intra-op threads of the timed work (a run's)."""

    def __init__(self, device: torch.device, threads: int = 1, min_seconds: float = 0.15
                 ) -> None:
        self.device, self.threads, self.min_seconds = device, threads, min_seconds
        self._memo: dict[tuple, float] = {}

    def engine(self, cfg: TrainConfig) -> EngineChoice:
        """The engine a run of `cfg` trains on: `engine.choice.choose_engine`, the decision the
        run itself takes (a probe that needs each step's gradients, another optimizer, amp or
        loss keeps it on autograd, which is slower per step)."""
        from batchlab.probes import make_probes

        return choose_engine(cfg, make_probes(cfg.probes))

    def _memo_get(self, key: tuple, fn: Callable[[], float]) -> float:
        if key not in self._memo:
            with threads(self.threads), torch.no_grad():
                self._memo[key] = fn()
        return self._memo[key]

    def step_seconds(self, dims: Sequence[int], b: int, k: int, cfg: TrainConfig) -> float:
        """Seconds per step of k stacked runs of `cfg` at batch size b, on the stepper the
        engine builds for it (`steppers.make_stepper` on the kind `engine(cfg)` names, with the
        run's optimizer settings and amp)."""
        timed = _step_config(cfg, dims, self.engine(cfg).kind)
        key = ("step", tuple(dims), b, k, timed.engine, timed.optimizer, timed.momentum,
               timed.nesterov, timed.weight_decay, tuple(timed.betas), timed.eps, timed.amp)
        return self._memo_get(key, lambda: self._step(list(dims), b, k, timed))

    def gd_step_seconds(self, dims: Sequence[int], n: int) -> float:
        """Seconds per full-batch gradient-descent step on n samples (sharpness's K7 sweep):
        plain SGD on autograd."""
        return self.step_seconds(dims, n, 1, make_config(hidden=list(dims[1:-1]),
                                                         engine="autograd"))

    def _step(self, dims: list[int], b: int, k: int, cfg: TrainConfig) -> float:
        dev = self.device
        nets = [build_mlp(dims[0], dims[1:-1], dims[-1], seed=i).to(dev) for i in range(k)]
        x = torch.rand(k, b, dims[0], device=dev)
        y = torch.randint(0, dims[-1], (k, b), device=dev)
        lrs = [cfg.lr] * k
        if cfg.engine == "fused":
            stepper = make_stepper([cfg] * k, nets, [[]] * k)
            return _timed(lambda: stepper.step(x, y, lrs), dev, self.min_seconds)
        # autograd is K = 1: k runs step one after another
        alone = [make_stepper([cfg], [n], [[]]) for n in nets]

        def step() -> None:
            with torch.enable_grad():
                for i, st in enumerate(alone):
                    st.step(x[i : i + 1], y[i : i + 1], lrs[:1])

        return _timed(step, dev, self.min_seconds)

    def eval_seconds_per_sample(self, dims: Sequence[int]) -> float:
        def run() -> float:
            net = build_mlp(dims[0], list(dims[1:-1]), dims[-1]).to(self.device).eval()
            x = torch.rand(4096, dims[0], device=self.device)
            return _timed(lambda: net(x).argmax(1), self.device, self.min_seconds) / 4096

        return self._memo_get(("eval", tuple(dims)), run)

    def trial_seconds(self, dims: Sequence[int], b: int, n: int, modes: Sequence[str],
                      engine: str | None) -> float:
        """Seconds of one gradient trial at batch size b on one thread (as trials run): the
        seconds per step of one trajectory, timed over at most PROBE_STEPS steps, times the
        trial's steps and trajectories (sum-loss is a second trajectory at b > 1)."""
        steps = math.ceil(n / b)
        mean_modes = [m for m in modes if m != "sum-loss"]
        trajectories = (1 if mean_modes else 0) + (1 if "sum-loss" in modes and (
            b > 1 or not mean_modes) else 0)
        return trajectories * steps * self.trial_step_seconds(dims, b, n, engine)

    def trial_step_seconds(self, dims: Sequence[int], b: int, n: int,
                           engine: str | None) -> float:
        from batchlab.analysis import gradcomp as gc

        m = min(n, b * min(PROBE_STEPS, math.ceil(n / b)))  # samples of the timed pass

        def run() -> float:
            model = build_mlp(dims[0], list(dims[1:-1]), dims[-1], seed=0).to(self.device)
            x = torch.rand(1, m, dims[0], device=self.device)
            y = torch.randint(0, dims[-1], (1, m), device=self.device)
            with threads(1 if self.device.type == "cpu" else self.threads):
                t = _timed(lambda: gc.run_trial_block(model, x, y, b, 1e-3, ["displacement"],
                                                      engine),
                           self.device, self.min_seconds, max_reps=3, warmup=1)
            return t / math.ceil(m / b)

        return self._memo_get(("trial", tuple(dims), b, m, engine), run)

    def hvp_seconds(self, dims: Sequence[int], n: int) -> float:
        """Seconds per Hessian-vector product of the mean loss over n samples."""
        from batchlab.measure import curvature as C

        def run() -> float:
            model = build_mlp(dims[0], list(dims[1:-1]), dims[-1], seed=0).to(self.device)
            x = torch.rand(n, dims[0], device=self.device)
            y = torch.randint(0, dims[-1], (n,), device=self.device)
            with torch.enable_grad():
                return _timed(lambda: C.hessian_trace(model, (x, y), n_samples=2, seed=0,
                                                      probes_per_pass=1),
                              self.device, self.min_seconds, max_reps=5, warmup=1) / 2

        return self._memo_get(("hvp", tuple(dims), n), run)
