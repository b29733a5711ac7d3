"""GPU throughput of the training engine, against the measured matmul roofline.

    python benchmarks/gpu.py [--batch-sizes 1,8,32,128,512,1024,2048] [--data-dir DIR]
                             [--reproduce] [--json results.json]

What it measures (needs CUDA; exits with a message when there is none):

1. The roofline: fp32 and TF32 GEMM throughput (a large square matmul, best of the repeats), so
   "% of roofline" is relative to this GPU as measured, not to a datasheet.
2. Samples/s vs batch size for the default MLP (784-1024-1024-10, 1.86M parameters), training
   exactly as `train()` does: data resident on the GPU, batches by `index_select` of a randperm,
   the fused SGD step (and the autograd path for comparison), no host sync inside the timed
   loop. Each step costs ~6P FLOPs per sample (forward 2P, backward 4P), so achieved FLOP/s =
   samples/s * 6P, reported as % of the fp32 and of the TF32 roofline. Every point is measured
   with TF32 matmuls off (the engine's default: results match the CPU) and on.
3. On CUDA, the fused step captured as one CUDA graph against the same step launched op by
   op (fp32), per batch size: whether capturing would pay.
4. With `--reproduce` (needs `--data-dir` holding MNIST; the device machine has no network):
   the wall time of `batchlab reproduce --preset paper --device cuda`, i.e. every experiment
   that has landed, into a temporary store and output directory.

Targets (issue 7, one H100): batch 1024 at >= 50% of the fp32/TF32 matmul roofline; the paper
preset of the MNIST study in <= 15 minutes. `--device cpu` runs parts 1-2 on the CPU, only to
check the script itself.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from batchlab.config import make_config
from batchlab.data import load_dataset, prepare
from batchlab.engine.fused import FusedMLPSGD
from batchlab.engine.steppers import AutogradStepper
from batchlab.nn.models import build_mlp


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], None], device: torch.device, min_seconds: float, min_calls: int
          ) -> float:
    """Seconds per call: warm-up, then repeat until both minimums are met (one sync at the end,
    so launches overlap as they do in the real loop). On a CPU: the plan's timing rule
    (`plan_timing.seconds_per_call`: fastest block, by CPU time per thread where another job
    takes the cores), so the CPU column can be measured on a shared machine."""
    if device.type == "cpu":
        from batchlab.experiments.plan_timing import seconds_per_call

        return seconds_per_call(fn, device, min_seconds)
    for _ in range(3):
        fn()
    sync(device)
    calls, t0 = 0, time.perf_counter()
    while True:
        for _ in range(min_calls):
            fn()
        calls += min_calls
        sync(device)
        elapsed = time.perf_counter() - t0
        if elapsed >= min_seconds:
            return elapsed / calls


def set_tf32(on: bool) -> None:
    torch.backends.cuda.matmul.allow_tf32 = on
    torch.backends.cudnn.allow_tf32 = on


def matmul_roofline(device: torch.device, n: int, repeats: int) -> float:
    """Best FLOP/s of an n x n x n fp32 matmul under the current TF32 setting."""
    a = torch.randn(n, n, device=device)
    b = torch.randn(n, n, device=device)
    best = math.inf
    for _ in range(repeats):
        best = min(best, timed(lambda: torch.mm(a, b), device, 0.2, 5))
    return 2 * n**3 / best


def mlp_samples_per_s(engine: str, x: torch.Tensor, y: torch.Tensor, batch_size: int,
                      device: torch.device, min_seconds: float) -> float:
    """Training samples/s of the default MLP at `batch_size`, as the engine's step loop runs."""
    cfg = make_config(batch_size=batch_size, lr=0.01, engine=engine, device=str(device))
    net = build_mlp(x.shape[1], cfg.hidden, 10, seed=0).to(device)
    n = len(y)
    gen = torch.Generator().manual_seed(0)
    state = {"perm": torch.randperm(n, generator=gen).to(device), "s": 0, "step": 0}
    n_steps = n // batch_size
    if engine == "fused":
        stepper = FusedMLPSGD.from_mlps([net])

        def update(xb: torch.Tensor, yb: torch.Tensor) -> None:
            stepper.step(xb.unsqueeze(0), yb.unsqueeze(0), cfg.lr)
    else:
        auto = AutogradStepper(cfg, net)

        def update(xb: torch.Tensor, yb: torch.Tensor) -> None:
            auto.step(xb.unsqueeze(0), yb.unsqueeze(0), [cfg.lr])

    def step() -> None:
        s = state["s"]
        idx = state["perm"][s * batch_size : (s + 1) * batch_size]
        update(x.index_select(0, idx), y.index_select(0, idx))
        state["s"] = (s + 1) % n_steps
        state["step"] += 1

    return batch_size / timed(step, device, min_seconds, 10)


def graph_samples_per_s(x: torch.Tensor, y: torch.Tensor, batch_size: int,
                        device: torch.device, min_seconds: float) -> float | str:
    """Samples/s of the fused step replayed as one CUDA graph (the batch gathered inside it
    from a static index buffer, refilled each step): what capturing the step would save in
    launch overhead, to decide whether the engine should capture. The reason as a string when
    the step cannot be captured."""
    net = build_mlp(x.shape[1], [1024, 1024], 10, seed=0).to(device)
    stepper = FusedMLPSGD.from_mlps([net])
    n = len(y)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(0)).to(device)
    idx = perm[:batch_size].clone()

    def body() -> None:
        stepper.step(x.index_select(0, idx).unsqueeze(0), y.index_select(0, idx).unsqueeze(0),
                     0.01)

    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        for _ in range(3):
            body()
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph):
            body()
    except Exception as e:  # noqa: BLE001 - why it cannot be captured is the finding
        return f"capture failed: {type(e).__name__}: {e}"[:300]
    n_steps, state = n // batch_size, {"s": 0}

    def step() -> None:
        s = state["s"]
        idx.copy_(perm[s * batch_size : (s + 1) * batch_size])
        graph.replay()
        state["s"] = (s + 1) % n_steps

    return batch_size / timed(step, device, min_seconds, 10)


def reproduce_wall(data_dir: str, executor: str) -> tuple[float, int, str]:
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "batchlab", "reproduce", "--preset", "paper",
               "--device", "cuda", "--data-dir", data_dir, "--out", f"{tmp}/out",
               "--store", f"{tmp}/runs.db", "--executor", executor]
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True)
        return time.perf_counter() - t0, proc.returncode, proc.stderr[-3000:]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda", help="cuda[:N] (cpu only to check the script)")
    ap.add_argument("--batch-sizes", default="1,8,32,128,512,1024,2048")
    ap.add_argument("--engines", default="fused,autograd")
    ap.add_argument("--data-dir", default=None, help="MNIST IDX files (default: mnist-5k)")
    ap.add_argument("--seconds", type=float, default=1.0, help="timed seconds per point")
    ap.add_argument("--reproduce", action="store_true", help="also time reproduce --preset paper")
    ap.add_argument("--executor", default="local", help="executor for --reproduce")
    ap.add_argument("--json", dest="json_out", default=None, help="write the results here")
    args = ap.parse_args()

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("benchmarks/gpu.py needs a CUDA GPU and none is available "
                 "(torch.cuda.is_available() is False); nothing was measured.")
    if args.reproduce and not args.data_dir:
        sys.exit("--reproduce needs --data-dir with the MNIST IDX files")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"device: {name}, torch {torch.__version__}")

    raw = load_dataset("mnist" if args.data_dir else "mnist-5k", args.data_dir)
    td = prepare(raw, device=device)
    x, y = td.x_train, td.y_train
    params = sum(p.numel() for p in build_mlp(td.input_dim, [1024, 1024], 10).parameters())
    flops_per_sample = 6 * params

    gemm_n = 8192 if device.type == "cuda" else 1024
    roof = {}
    for mode in ("fp32", "tf32"):
        set_tf32(mode == "tf32")
        roof[mode] = matmul_roofline(device, gemm_n, repeats=3)
        print(f"matmul roofline {mode}: {roof[mode] / 1e12:.2f} TFLOP/s (n={gemm_n})")

    rows = []
    print(f"{'engine':>8} {'mm':>4} {'batch':>6} {'samples/s':>12} {'TFLOP/s':>8} "
          f"{'%fp32':>6} {'%tf32':>6}")
    for engine in args.engines.split(","):
        for bs in (int(b) for b in args.batch_sizes.split(",")):
            if bs > len(y):
                continue
            for mode in ("fp32", "tf32"):
                set_tf32(mode == "tf32")
                sps = mlp_samples_per_s(engine, x, y, bs, device, args.seconds)
                flops = sps * flops_per_sample
                row = {"engine": engine, "matmul": mode, "batch_size": bs, "samples_per_s": sps,
                       "tflops": flops / 1e12, "pct_fp32_roofline": 100 * flops / roof["fp32"],
                       "pct_tf32_roofline": 100 * flops / roof["tf32"]}
                rows.append(row)
                print(f"{engine:>8} {mode:>4} {bs:>6} {sps:>12,.0f} {row['tflops']:>8.2f} "
                      f"{row['pct_fp32_roofline']:>6.1f} {row['pct_tf32_roofline']:>6.1f}")
    set_tf32(False)

    graphs = []  # CUDA graphs: the fused step captured vs launched op by op (fp32)
    if device.type == "cuda" and "fused" in args.engines.split(","):
        eager = {r["batch_size"]: r["samples_per_s"] for r in rows
                 if r["engine"] == "fused" and r["matmul"] == "fp32"}
        print(f"{'batch':>6} {'eager/s':>12} {'graph/s':>12} {'speedup':>8}  (fused, fp32)")
        for bs in sorted(eager):
            got = graph_samples_per_s(x, y, bs, device, args.seconds)
            if isinstance(got, str):
                graphs.append({"batch_size": bs, "error": got})
                print(f"{bs:>6} {got}")
                break
            graphs.append({"batch_size": bs, "eager_samples_per_s": eager[bs],
                           "graph_samples_per_s": got, "speedup": got / eager[bs]})
            print(f"{bs:>6} {eager[bs]:>12,.0f} {got:>12,.0f} {got / eager[bs]:>8.2f}")

    result = {"device": name, "torch": torch.__version__, "params": params,
              "roofline_flops": roof, "mlp": rows, "cuda_graphs": graphs}
    if args.reproduce:
        wall, rc, tail = reproduce_wall(args.data_dir, args.executor)
        result["reproduce_paper"] = {"seconds": wall, "returncode": rc}
        print(f"reproduce --preset paper: {wall / 60:.1f} min (exit {rc})")
        if rc != 0:
            print(tail, file=sys.stderr)
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
