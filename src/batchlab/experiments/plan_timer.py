"""The timer behind `--plan` (`Timer`; not a training probe, `batchlab.probes`): short timings
on this device, memoized per shape.

Each timing runs the code the real work runs (the stepper `engine.steppers.make_stepper` builds
for the engine `engine.choice.choose_engine` picks: fused SGD for K stacked MLPs, or autograd
with the run's optimizer where the run cannot use it; a gradient trial through
`run_trial_block` on one thread; a Hessian-vector product through the curvature module), after
a warm-up, for about
`min_seconds` in a few blocks, keeping the fastest block, each block timed by the smaller of
its wall time and its CPU time per thread (so another job on the CPU does not inflate it).
Small shapes are timed directly; nothing is extrapolated from FLOP counts.

Besides the step, a run costs what the loop does around it, each timed by running that code:
its probes (`step_probe_seconds`: a probe called every step, such as `steplengths`, amortized
over its own cycle; `probe_epoch_seconds`: every probe's epoch-end and start hooks, e.g.
`steplengths`' per-layer Lanczos), its evaluations (`evaluation_seconds`: the loop's
`eval_metrics`, with autograd on as in the loop) and its fixed cost (`run_fixed_seconds`: the
model built, its initial weights copied, the test set's per-example correctness, the run and its
checkpoint files saved to a store). Sharpness's curvature is timed as its tasks run it: on one
thread (`task_threads`), a Hessian-vector product, a loss-and-gradient and one real
eps-sharpness maximisation (`eps_sharpness_seconds`).
"""

from __future__ import annotations

import math
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from batchlab.config import TrainConfig, make_config
from batchlab.engine.choice import EngineChoice, EngineKind, choose_engine
from batchlab.engine.steppers import make_stepper
from batchlab.experiments.plan_timing import seconds_per_call
from batchlab.nn.models import build_mlp
from batchlab.probes import make_probes
from batchlab.runs.tasks import threads

PROBE_STEPS = 64  # steps of a timed gradient-trial pass (the per-step cost does not depend on n)
EVAL_SAMPLES = 4096  # samples per evaluation set timed (evaluation is linear in the samples)
CURVATURE_SAMPLES = 4096  # samples of a timed loss-and-gradient or HVP (linear above it)
SHARPNESS_SAMPLES = 256  # samples of the timed real eps-sharpness call (its fixed part)


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


class Timer:
    """Memoized timings. `threads`: intra-op threads of the timed work (a run's)."""

    def __init__(self, device: torch.device, threads: int = 1, min_seconds: float = 0.15
                 ) -> None:
        self.device, self.threads, self.min_seconds = device, threads, min_seconds
        self._memo: dict[tuple, float] = {}

    def engine(self, cfg: TrainConfig) -> EngineChoice:
        """The engine a run of `cfg` trains on: `engine.choice.choose_engine`, the decision the
        run itself takes (a probe that needs each step's gradients, another optimizer, amp or
        loss keeps it on autograd, which is slower per step)."""
        return choose_engine(cfg, make_probes(cfg.probes))

    def _memo_get(self, key: tuple, fn: Callable[[], float], n_threads: int | None = None
                  ) -> float:
        """fn() once per key, on `n_threads` intra-op threads (default: the runs').

        On a CPU with more than one thread it is also timed on one thread, and the smaller
        time is kept: when another job holds a core, the threads of a parallel op wait for the
        one that is off its core (OpenMP spins while it waits, so even CPU time grows: a
        2-thread step of batch 2 took 12x its idle time at load 5 here), while one thread's CPU
        time does not grow. On an idle machine N threads are not slower than one, so the
        minimum is the idle figure either way."""
        if key not in self._memo:
            n = n_threads or self.threads
            with threads(n), torch.no_grad():
                self._memo[key] = fn()
            if n > 1 and self.device.type == "cpu":
                with threads(1), torch.no_grad():
                    self._memo[key] = min(self._memo[key], fn())
        return self._memo[key]

    def step_seconds(self, dims: Sequence[int], b: int, k: int, cfg: TrainConfig,
                     n_threads: int | None = None) -> float:
        """Seconds per step of k stacked runs of `cfg` at batch size b, on the stepper the
        engine builds for it (`steppers.make_stepper` on the kind `engine(cfg)` names, with the
        run's optimizer settings and amp); on `n_threads` threads (default: the runs')."""
        timed = _step_config(cfg, dims, self.engine(cfg).kind)
        key = ("step", tuple(dims), b, k, timed.engine, timed.optimizer, timed.momentum,
               timed.nesterov, timed.weight_decay, tuple(timed.betas), timed.eps, timed.amp,
               n_threads)
        return self._memo_get(key, lambda: self._step(list(dims), b, k, timed), n_threads)

    def gd_step_seconds(self, dims: Sequence[int], n: int) -> float:
        """Seconds per full-batch gradient-descent step on n samples (sharpness's K7 sweep):
        plain SGD on autograd, on one task thread (the sweep is a measurement task)."""
        return self.step_seconds(dims, n, 1, make_config(hidden=list(dims[1:-1]),
                                                         engine="autograd"), self.task_threads)

    def _step(self, dims: list[int], b: int, k: int, cfg: TrainConfig) -> float:
        dev = self.device
        nets = [build_mlp(dims[0], dims[1:-1], dims[-1], seed=i).to(dev) for i in range(k)]
        x = torch.rand(k, b, dims[0], device=dev)
        y = torch.randint(0, dims[-1], (k, b), device=dev)
        lrs = [cfg.lr] * k
        if cfg.engine == "fused":
            stepper = make_stepper([cfg] * k, nets, [[]] * k)
            return seconds_per_call(lambda: stepper.step(x, y, lrs), dev, self.min_seconds)
        # autograd is K = 1: k runs step one after another
        alone = [make_stepper([cfg], [n], [[]]) for n in nets]

        def step() -> None:
            with torch.enable_grad():
                for i, st in enumerate(alone):
                    st.step(x[i : i + 1], y[i : i + 1], lrs[:1])

        return seconds_per_call(step, dev, self.min_seconds)

    def eval_seconds_per_sample(self, dims: Sequence[int], n_threads: int | None = None
                                ) -> float:
        """Seconds per sample of a forward pass without autograd (sharpness's interpolation)
        on `n_threads` threads (default: the runs')."""
        def run() -> float:
            net = build_mlp(dims[0], list(dims[1:-1]), dims[-1]).to(self.device).eval()
            x = torch.rand(4096, dims[0], device=self.device)
            return seconds_per_call(lambda: net(x).argmax(1), self.device, self.min_seconds) / 4096

        return self._memo_get(("eval", tuple(dims), n_threads), run, n_threads)

    def trial_seconds(self, dims: Sequence[int], b: int, n: int, modes: Sequence[str],
                      backend: str | None) -> float:
        """Seconds of one gradient trial at batch size b on one thread (as trials run, on the
        trial backend `backend`, `analysis.gradcomp.BACKENDS`): the
        seconds per step of one trajectory, timed over at most PROBE_STEPS steps, times the
        trial's steps and trajectories (sum-loss is a second trajectory at b > 1)."""
        steps = math.ceil(n / b)
        mean_modes = [m for m in modes if m != "sum-loss"]
        trajectories = (1 if mean_modes else 0) + (1 if "sum-loss" in modes and (
            b > 1 or not mean_modes) else 0)
        return trajectories * steps * self.trial_step_seconds(dims, b, n, backend)

    def trial_step_seconds(self, dims: Sequence[int], b: int, n: int,
                           backend: str | None) -> float:
        from batchlab.analysis import gradcomp as gc

        m = min(n, b * min(PROBE_STEPS, math.ceil(n / b)))  # samples of the timed pass

        def run() -> float:
            model = build_mlp(dims[0], list(dims[1:-1]), dims[-1], seed=0).to(self.device)
            x = torch.rand(1, m, dims[0], device=self.device)
            y = torch.randint(0, dims[-1], (1, m), device=self.device)
            with threads(1 if self.device.type == "cpu" else self.threads):
                t = seconds_per_call(lambda: gc.run_trial_block(model, x, y, b, 1e-3, ["displacement"],
                                                      backend),
                           self.device, self.min_seconds, max_reps=3, warmup=1)
            return t / math.ceil(m / b)

        return self._memo_get(("trial", tuple(dims), b, m, backend), run)

    def hvp_seconds(self, dims: Sequence[int], n: int, n_threads: int | None = None) -> float:
        """Seconds per Hessian-vector product of the mean loss over n samples, on `n_threads`
        threads (curvature tasks: `task_threads`), timed on up to CURVATURE_SAMPLES samples
        and scaled linearly above."""
        from batchlab.measure import curvature as C

        m = min(n, CURVATURE_SAMPLES)

        def run() -> float:
            model = build_mlp(dims[0], list(dims[1:-1]), dims[-1], seed=0).to(self.device)
            x = torch.rand(m, dims[0], device=self.device)
            y = torch.randint(0, dims[-1], (m,), device=self.device)
            with torch.enable_grad():
                return seconds_per_call(lambda: C.hessian_trace(model, (x, y), n_samples=2, seed=0,
                                                      probes_per_pass=1),
                              self.device, self.min_seconds, max_reps=5, warmup=1) / 2 * n / m

        return self._memo_get(("hvp", tuple(dims), n, n_threads), run, n_threads)

    # -- what a run costs besides its steps ---------------------------------------------------
    @property
    def task_threads(self) -> int:
        """Intra-op threads of a measurement task (curvature units, trials): one on a CPU
        (tasks run in parallel on worker threads instead), the runs' on a GPU."""
        return 1 if self.device.type == "cpu" else self.threads

    def step_probe_seconds(self, dims: Sequence[int], b: int, cfg: TrainConfig) -> float:
        """Seconds per step that `cfg`'s step probes add (0 without one): each probe's
        `on_step` timed as the loop calls it - after a real step on the run's stepper, at every
        `every_steps`-th step, over one cycle of `record_every` calls for a probe that
        measures every so many calls (`steplengths`: a measurement and a weight copy per 5) -
        and amortized per step."""
        if not any(p.every_steps for p in make_probes(list(cfg.probes))):
            return 0.0
        return self._memo_get(self._probe_key("probe-step", dims, b, cfg),
                              lambda: self._time_probes(list(dims), b, cfg, True)[0])

    def probe_epoch_seconds(self, dims: Sequence[int], cfg: TrainConfig) -> tuple[float, float]:
        """(seconds of the probes' `on_start`, seconds of their `on_epoch_end` per epoch) for
        `cfg`'s probes, e.g. `steplengths`' per-layer Lanczos at each epoch's end."""
        if not cfg.probes:
            return 0.0, 0.0
        b = min(cfg.batch_sizes())
        key = self._probe_key("probe-hooks", dims, b, cfg)
        if key not in self._memo:
            with threads(self.threads):
                self._memo[key] = self._time_probes(list(dims), b, cfg, False)[1]
        return self._memo[key]  # type: ignore[return-value]

    def _probe_key(self, what: str, dims: Sequence[int], b: int, cfg: TrainConfig) -> tuple:
        return (what, tuple(dims), b, tuple(cfg.probes), self.engine(cfg).kind,
                cfg.target_metric, cfg.target_value, cfg.dataset, cfg.data_dir, cfg.max_train)

    def _time_probes(self, dims: list[int], b: int, cfg: TrainConfig, steps: bool
                     ) -> tuple[float, tuple[float, float]]:
        """`cfg`'s probes on a model of `dims` on the run's stepper and data, started: with
        `steps` (per-step seconds, (0, 0)), else (0, (on_start, on_epoch_end seconds))."""
        from batchlab.engine.setup import get_data
        from batchlab.probes import ProbeContext
        from batchlab.probes.geometry import snapshot

        dev = self.device
        td = get_data(cfg, dev)
        net = build_mlp(dims[0], dims[1:-1], dims[-1], seed=0).to(dev)
        probes = make_probes(list(cfg.probes))
        timed = _step_config(cfg, dims, self.engine(cfg).kind)
        stepper = make_stepper([timed], [net], [probes])
        ctx = ProbeContext(model=net, init_state=snapshot(net), config=cfg, data=td,
                           optimizer=stepper.optimizer)
        x = torch.rand(1, b, dims[0], device=dev)
        y = torch.randint(0, dims[-1], (1, b), device=dev)
        with torch.enable_grad():
            if not steps:
                start = seconds_per_call(lambda: [p.on_start(ctx) for p in probes], dev,
                               self.min_seconds, max_reps=5, warmup=0)
                stepper.step(x, y, [timed.lr])
                epoch = seconds_per_call(lambda: [p.on_epoch_end(ctx, 1) for p in probes], dev,
                               self.min_seconds, max_reps=5, warmup=1)
                return 0.0, (start, epoch)
            for p in probes:
                p.on_start(ctx)  # a probe may set its cadence from the data (target_step)
            stepper.step(x, y, [timed.lr])  # the gradients a probe reads after the update
            per_step = 0.0
            for p in probes:
                if not p.every_steps:
                    continue
                every, cycle = int(p.every_steps), max(1, int(getattr(p, "record_every", 1)))
                count = [0]

                def calls(p: Any = p, every: int = every, cycle: int = cycle,
                          count: list[int] = count) -> None:
                    for _ in range(cycle):
                        count[0] += 1
                        stepper.sync()
                        p.on_step(ctx, count[0] * every, x[0], y[0])

                per_step += seconds_per_call(calls, dev, self.min_seconds, max_reps=20,
                                   warmup=1) / (cycle * every)
        return per_step, (0.0, 0.0)

    def evaluation_seconds(self, dims: Sequence[int], cfg: TrainConfig) -> float:
        """Seconds of one evaluation as the loop runs it (`eval_metrics` over every evaluation
        set of `cfg`'s data, autograd on as in the loop), timed on up to EVAL_SAMPLES samples
        per set and scaled to the sets' sizes."""
        from batchlab.engine.setup import get_data
        from batchlab.measure.metrics import eval_metrics

        td = get_data(cfg, self.device)
        sizes = tuple(len(y) for _, y in td.eval_sets.values())

        def run() -> float:
            net = build_mlp(dims[0], list(dims[1:-1]), dims[-1], seed=0).to(self.device)
            sub = _Sets({k: (x[:EVAL_SAMPLES], y[:EVAL_SAMPLES])
                         for k, (x, y) in td.eval_sets.items()})
            timed = sum(len(y) for _, y in sub.eval_sets.values())
            with torch.enable_grad():
                t = seconds_per_call(lambda: eval_metrics(net, sub, None), self.device, self.min_seconds)
            return t * sum(sizes) / max(1, timed)

        return self._memo_get(("evaluation", tuple(dims), sizes), run)

    def run_fixed_seconds(self, dims: Sequence[int], cfg: TrainConfig, checkpoints: int,
                          rows: int) -> float:
        """Seconds a run spends once, outside its steps, evaluations and probes: its model
        built and its initial weights copied, the test set's per-example correctness
        (`correct_bits`), and the run saved (`runs.training.save_result`: `checkpoints`
        safetensors files with their sha256 and the store row with `rows` epoch rows) into a
        temporary store."""
        from batchlab.engine.result import TrainResult
        from batchlab.engine.setup import get_data
        from batchlab.measure.metrics import correct_bits
        from batchlab.probes.geometry import snapshot
        from batchlab.runs.store import Store
        from batchlab.runs.training import save_result

        td = get_data(cfg, self.device)
        test = td.eval_sets.get("test")

        def run() -> float:
            row = {"epoch": 1, **{f"metric_{i}": 0.5 for i in range(24)}}
            with tempfile.TemporaryDirectory() as tmp, Store(Path(tmp) / "plan.db") as st:
                count = [0]

                def once() -> None:
                    net = build_mlp(dims[0], list(dims[1:-1]), dims[-1], seed=0).to(self.device)
                    init = snapshot(net)
                    if test is not None:
                        correct_bits(net, test[0][:EVAL_SAMPLES], test[1][:EVAL_SAMPLES])
                    count[0] += 1
                    rid = f"plan{count[0]:08d}"
                    save_result(st, TrainResult(
                        run_id=rid, key=rid * 4, config=cfg, status="completed",
                        epochs=[dict(row, epoch=e) for e in range(rows)], final=dict(row),
                        checkpoints={e: init for e in range(checkpoints)}), "plan")

                t = seconds_per_call(once, self.device, self.min_seconds, max_reps=5, warmup=1)
            if test is not None and len(test[1]) > EVAL_SAMPLES:  # correct_bits is linear
                t += (len(test[1]) / EVAL_SAMPLES - 1) * self.evaluation_seconds(dims, cfg) * (
                    EVAL_SAMPLES / sum(len(y) for _, y in td.eval_sets.values()))
            return t

        return self._memo_get(("run-fixed", tuple(dims), checkpoints, rows,
                               None if test is None else len(test[1])), run)

    # -- sharpness's curvature, as its tasks run it ------------------------------------------
    def loss_grad_seconds(self, dims: Sequence[int], n: int) -> float:
        """Seconds of one loss and gradient of the mean loss over n samples (what L-BFGS-B
        evaluates in eps-sharpness) on one task thread; timed on up to CURVATURE_SAMPLES
        samples, linear above."""
        from batchlab.measure import curvature as C

        m = min(n, CURVATURE_SAMPLES)

        def run() -> float:
            model = build_mlp(dims[0], list(dims[1:-1]), dims[-1], seed=0).to(self.device)
            x = torch.rand(m, dims[0], device=self.device)
            y = torch.randint(0, dims[-1], (m,), device=self.device)
            obj = C.Objective(model, (x, y))
            with torch.enable_grad():
                return seconds_per_call(lambda: obj.loss_and_grad(obj.theta), self.device,
                              self.min_seconds, max_reps=20) * n / m

        return self._memo_get(("loss-grad", tuple(dims), n), run, self.task_threads)

    def eps_sharpness_seconds(self, dims: Sequence[int], n: int,
                              subspace_dim: int | None) -> float:
        """Seconds of one Keskar eps-sharpness maximisation on n samples (one task thread): a
        real `curvature.sharpness` call (L-BFGS-B, its default 10 iterations, the random
        subspace drawn when `subspace_dim` is set) timed on SHARPNESS_SAMPLES samples, plus its
        function evaluations' extra cost at n samples."""
        from batchlab.measure import curvature as C

        m = min(n, SHARPNESS_SAMPLES)

        def run() -> float:
            model = build_mlp(dims[0], list(dims[1:-1]), dims[-1], seed=0).to(self.device)
            x = torch.rand(m, dims[0], device=self.device)
            y = torch.randint(0, dims[-1], (m,), device=self.device)
            got: list[Any] = []
            kw = {} if subspace_dim is None else {"subspace_dim": subspace_dim}
            with torch.enable_grad():
                t = seconds_per_call(lambda: got.append(C.sharpness(model, (x, y), epsilon=1e-3, **kw)),
                           self.device, self.min_seconds, max_reps=2, warmup=0)
            extra = self.loss_grad_seconds(dims, n) - self.loss_grad_seconds(dims, m)
            return t + (got[-1].evaluations + 1) * max(0.0, extra)  # + the loss at x0

        return self._memo_get(("eps-sharpness", tuple(dims), n, subspace_dim), run,
                              self.task_threads)


class _Sets:
    """Evaluation sets alone: what `eval_metrics` reads of a data set."""

    streamed = False

    def __init__(self, eval_sets: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
        self.eval_sets = eval_sets
