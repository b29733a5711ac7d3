"""batchlab.measure.curvature vs the `pyhessian` package, side by side in one process.

Same model (a trained 784-128-128-10 MLP by default), same data (the first --samples training
images), same criterion (NLLLoss on the log-softmax outputs), same numbers of probes:

- time per Hessian-vector product: PyHessian's `hessian_vector_product` through its kept
  gradient graph vs `Objective.hvp` (graph kept too), and `Objective.hvp_many` (batched);
- Hutchinson trace at --probes probes (both with tol=0, so both use every probe);
- SLQ density at --density-vectors runs of --density-steps Lanczos steps;
- top-5 eigenvalues at equal accuracy: PyHessian's power iteration (maxIter 100, tol 1e-3, its
  rule), against a tight reference (Lanczos, error bound 1e-8); then batchlab's Lanczos with
  its error bound set to the accuracy PyHessian reached, and with PyHessian's own rule;
- agreement: the products, the per-probe z^T H z and the density's Lanczos nodes computed by
  both from identical vectors (PyHessian's own draws), as max relative differences;
- optionally (--loader-samples) the case that does not fit one batch: PyHessian's dataloader
  products vs batchlab's chunked ones.

Every timing is the best of --repeats runs of each, because the machine may be shared (the load
average is printed before and after); on a busy machine `--threads 1 --clock cpu` measures the
work done (process CPU time) rather than the wait. PyHessian 0.1 calls `torch.eig`,
removed from torch 2: the benchmark supplies it from `torch.linalg.eigh` (the tridiagonal
matrix is symmetric; this costs microseconds). Goals (issue 15): time per HVP <= PyHessian's;
trace and density >= 1.5x faster; top-5 eigenvalues >= 2x faster at equal accuracy.

Install: pip install -e .[bench]   (or pip install --no-deps pyhessian==0.1: it needs only torch)
Usage:   python benchmarks/curvature.py [--samples 2000] [--hidden 128,128] [--repeats 3]
At equal accuracy (issue 21): --trace-accuracy (exact trace reference) and --density-accuracy
(exact spectrum reference, Wasserstein-1; deflated SLQ vs SLQ vs PyHessian), each with --hidden
small enough for its reference (results/curvature-benchmark/README.md has the commands).
"""

from __future__ import annotations

import argparse
import math
import os
import time
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import nn

from batchlab.engine.setup import get_data
from batchlab.measure import curvature as C
from batchlab.runs.training import train


def _install_torch_eig() -> None:
    """PyHessian 0.1's density() calls torch.eig(T, eigenvectors=True) (a stub that raises
    since torch 2)."""

    def eig(T: torch.Tensor, eigenvectors: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        w, v = torch.linalg.eigh(T)
        return torch.stack([w, torch.zeros_like(w)], 1), v

    torch.eig = eig  # type: ignore[attr-defined]


CLOCK: Callable[[], float] = time.perf_counter


def best(fn: Callable[[], Any], repeats: int) -> tuple[float, Any]:
    """The fastest of `repeats` runs of fn, on CLOCK (wall, or CPU time with --clock cpu)."""
    out, times = None, []
    for _ in range(repeats):
        t0 = CLOCK()
        out = fn()
        times.append(CLOCK() - t0)
    return min(times), out


def load() -> str:
    return " ".join(f"{x:.1f}" for x in os.getloadavg())


def rel(a: np.ndarray | torch.Tensor, b: np.ndarray | torch.Tensor) -> float:
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


def pyhessian_probes(params: list[torch.Tensor], n: int, seed: int) -> torch.Tensor:
    """The Rademacher probes PyHessian's trace()/density() draw after torch.manual_seed(seed)."""
    torch.manual_seed(seed)
    rows = []
    for _ in range(n):
        v = [torch.randint_like(p, high=2) for p in params]
        for vi in v:
            vi[vi == 0] = -1
        rows.append(torch.cat([vi.reshape(-1) for vi in v]))
    return torch.stack(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=2000)
    ap.add_argument("--hidden", default="128,128")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--probes", type=int, default=64, help="Hutchinson probes")
    ap.add_argument("--density-steps", type=int, default=60)
    ap.add_argument("--density-vectors", type=int, default=4)
    ap.add_argument("--top", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                    help="cpu: process CPU time, robust to other processes on a shared machine "
                         "(use with --threads 1)")
    ap.add_argument("--loader-samples", type=int, default=0,
                    help="also compare the chunked case on this many samples (0: skip)")
    ap.add_argument("--loader-batch", type=int, default=2000)
    ap.add_argument("--trace-accuracy", action="store_true",
                    help="only the time-to-accuracy trace comparison (issue 21): Hutchinson, "
                         "Hutch++ and PyHessian to --rtol at 95%% against an exact reference")
    ap.add_argument("--rtol", type=float, default=0.01)
    ap.add_argument("--runs", type=int, default=20, help="repeated runs per method (seeds)")
    ap.add_argument("--hutchinson-runs", type=int, default=0,
                    help="runs of batchlab's Hutchinson (0: --runs); it is the slow one")
    ap.add_argument("--density-accuracy", action="store_true",
                    help="only the time-to-accuracy spectral density comparison (issue 21): "
                         "plain SLQ (PyHessian, batchlab) and batchlab's deflated SLQ to "
                         "Wasserstein-1 <= --dtol x mean|lambda| against the exact spectrum")
    ap.add_argument("--dtol", type=float, default=0.1,
                    help="density target: W1(estimate, exact) <= dtol x mean |eigenvalue|")
    ap.add_argument("--spectrum-cache", default="",
                    help="an .npy file to keep the exact spectrum in between runs (optional)")
    ap.add_argument("--slq-runs", type=int, default=5,
                    help="runs per plain-SLQ configuration (the slow ones)")
    a = ap.parse_args()
    if a.trace_accuracy:
        trace_accuracy(a)
        return
    if a.density_accuracy:
        density_accuracy(a)
        return

    import sys

    from pyhessian import hessian as PyHessian
    from pyhessian.utils import hessian_vector_product

    _install_torch_eig()
    warnings.filterwarnings("ignore", message="Using backward\\(\\) with create_graph")
    calls = [0]

    def counted(*args: Any, **kw: Any) -> Any:
        calls[0] += 1
        return hessian_vector_product(*args, **kw)

    sys.modules["pyhessian.hessian"].hessian_vector_product = counted  # count its products
    if a.threads:
        torch.set_num_threads(a.threads)
    global CLOCK
    CLOCK = time.process_time if a.clock == "cpu" else time.perf_counter

    print(f"load average before: {load()}; torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, {a.clock} clock")
    hidden = [int(h) for h in a.hidden.split(",")]
    res = train({"dataset": "mnist-5k", "hidden": hidden, "epochs": a.epochs, "batch_size": 64,
                 "lr": 0.01, "probes": [], "seed": a.seed})
    model = res.model.eval()
    td = get_data(res.config, torch.device("cpu"))
    X, y = td.x_train[: a.samples], td.y_train[: a.samples]
    crit = nn.NLLLoss()
    params = [p for p in model.parameters() if p.requires_grad]
    print(f"model: MLP 784-{'-'.join(map(str, hidden))}-10 "
          f"({sum(p.numel() for p in params):,} params), {a.epochs} epochs SGD; data: {len(y)} "
          f"images; criterion NLLLoss; best of {a.repeats}\n")

    def ph_new() -> Any:
        model.zero_grad(set_to_none=True)  # PyHessian accumulates into .grad
        return PyHessian(model, crit, data=(X, y), cuda=False)

    rows: list[tuple[str, str, str, str, str]] = []
    goals: list[tuple[str, bool, str]] = []

    # --- graph build + one product
    t_ph_build, h = best(ph_new, a.repeats)
    t_bl_build, obj = best(lambda: _built(model, X, y, crit), a.repeats)
    V = pyhessian_probes(params, 8, a.seed).to(obj.theta.dtype)
    vs = [p.view_as(q) for p, q in zip(V[0].split(obj.numels), params)]
    reps = 5
    t_ph_hvp, hv_ph = best(lambda: [hessian_vector_product(h.gradsH, h.params, vs)
                                    for _ in range(reps)][-1], a.repeats)
    t_bl_hvp, hv_bl = best(lambda: [obj.hvp(V[0]) for _ in range(reps)][-1], a.repeats)
    obj8 = C.Objective(model, (X, y), criterion=crit, probes_per_pass=8)
    t_bl_many, many = best(lambda: obj8.hvp_many(V), a.repeats)
    ph_flat = torch.cat([t.reshape(-1) for t in hv_ph])
    agree_hvp = rel(hv_bl, ph_flat)
    rows += [("graph build (fwd + bwd, create_graph)", f"{t_ph_build:.4f}", f"{t_bl_build:.4f}",
              f"{t_ph_build / t_bl_build:.2f}x", ""),
             ("time per HVP (s)", f"{t_ph_hvp / reps:.4f}", f"{t_bl_hvp / reps:.4f}",
              f"{t_ph_hvp / t_bl_hvp:.2f}x", f"max rel diff {agree_hvp:.1e}"),
             ("time per HVP, 8 batched probes (s)", f"{t_ph_hvp / reps:.4f}",
              f"{t_bl_many / 8:.4f}", f"{t_ph_hvp / reps / (t_bl_many / 8):.2f}x",
              f"max rel diff {rel(many[0], ph_flat):.1e}")]
    goals.append(("time per HVP <= PyHessian's", t_bl_hvp <= t_ph_hvp, f"{t_ph_hvp / t_bl_hvp:.2f}x"))

    prof = [_matmul_profile(lambda: hessian_vector_product(h.gradsH, h.params, vs), 1),
            _matmul_profile(lambda: obj.hvp(V[0]), 1), _matmul_profile(lambda: obj8.hvp_many(V), 8)]
    notes = [f"{name}: {gf:.2f} GFLOP in matmuls per HVP, {share:.0%} of the time"
             for name, (gf, share) in zip(("pyhessian", "batchlab", "batchlab 8 batched"), prof)]

    # --- Hutchinson trace at equal probes
    P = a.probes

    def ph_trace() -> list[float]:
        torch.manual_seed(a.seed)
        return h.trace(maxIter=P, tol=0.0)

    bl = C.Hessian(model, crit, data=(X, y), seed=a.seed)
    t_ph_tr, s_ph = best(ph_trace, a.repeats)
    t_bl_tr, s_bl = best(lambda: bl.trace(maxIter=P, tol=0.0), a.repeats)
    Z = pyhessian_probes(params, P, a.seed)
    same = (Z * torch.cat([bl.obj.hvp_many(z) for z in Z.split(8)])).sum(1)
    rows.append((f"trace, {P} probes (s)", f"{t_ph_tr:.3f}", f"{t_bl_tr:.3f}",
                 f"{t_ph_tr / t_bl_tr:.2f}x",
                 f"same probes: max rel diff {rel(same, s_ph):.1e}; estimates "
                 f"{np.mean(s_ph):.2f} / {np.mean(s_bl):.2f}"))
    goals.append(("trace >= 1.5x faster", t_ph_tr / t_bl_tr >= 1.5, f"{t_ph_tr / t_bl_tr:.2f}x"))
    bl8 = C.Hessian(model, crit, data=(X, y), seed=a.seed, probes_per_pass=8)
    t_bl_tr8, _ = best(lambda: bl8.trace(maxIter=P, tol=0.0), a.repeats)
    rows.append((f"trace, {P} probes, 8 per pass (s)", f"{t_ph_tr:.3f}", f"{t_bl_tr8:.3f}",
                 f"{t_ph_tr / t_bl_tr8:.2f}x", "batched probes (is_grads_batched)"))

    # --- SLQ density at equal probes
    S, nv = a.density_steps, a.density_vectors

    def ph_density() -> Any:
        torch.manual_seed(a.seed)
        return h.density(iter=S, n_v=nv)

    t_ph_d, (e_ph, _) = best(ph_density, a.repeats)
    t_bl_d, (e_bl, _) = best(lambda: bl.density(iter=S, n_v=nv), a.repeats)
    starts = pyhessian_probes(params, nv, a.seed)
    runs = C.lanczos_many(bl.obj.hvp_many, starts, S)
    width = max(max(r) for r in e_ph) - min(min(r) for r in e_ph)
    node_diff = max(float(np.max(np.abs(np.sort(C.krylov.ritz(al, be)[0])[-5:]
                                        - np.sort(np.asarray(r))[-5:])))
                    for (al, be), r in zip(runs, e_ph)) / width
    rows.append((f"density, {nv} x {S} Lanczos steps (s)", f"{t_ph_d:.3f}", f"{t_bl_d:.3f}",
                 f"{t_ph_d / t_bl_d:.2f}x",
                 f"same starts: top-5 nodes differ by {node_diff:.1e} of the spectral width; "
                 f"top node {max(e_ph[0]):.3f} / {max(e_bl[0]):.3f}"))
    goals.append(("density >= 1.5x faster", t_ph_d / t_bl_d >= 1.5, f"{t_ph_d / t_bl_d:.2f}x"))

    # --- top-k eigenvalues at equal accuracy
    k = a.top
    ref = C.top_eigenvalues(bl.obj, k, tol=1e-8, max_iter=300, seed=a.seed + 1, on_fail="raise")
    want = np.asarray(ref.eigenvalues)

    def ph_eigs() -> tuple[list[float], int]:
        torch.manual_seed(a.seed)
        calls[0] = 0
        vals, _ = h.eigenvalues(maxIter=100, tol=1e-3, top_n=k)
        return sorted(vals, reverse=True), calls[0]

    t_ph_e, (ev_ph, n_ph) = best(ph_eigs, a.repeats)
    err_ph = float(np.max(np.abs(np.asarray(ev_ph) - want) / np.abs(want)))

    def bl_eigs(tol: float, rule: str) -> tuple[list[float], int]:
        r = C.top_eigenvalues(bl.obj, k, tol=tol, max_iter=300, seed=a.seed, on_fail="ignore",
                              rule=rule)
        return r.eigenvalues, r.n_hvp

    t_bl_e, (ev_bl, n_bl) = best(lambda: bl_eigs(max(err_ph, 1e-7), "bound"), a.repeats)
    err_bl = float(np.max(np.abs(np.asarray(ev_bl) - want) / np.abs(want)))
    t_bl_c, (ev_c, n_c) = best(lambda: bl_eigs(1e-3, "change"), a.repeats)
    err_c = float(np.max(np.abs(np.asarray(ev_c) - want) / np.abs(want)))
    rows.append((f"top-{k} eigenvalues, equal accuracy (s)", f"{t_ph_e:.3f}", f"{t_bl_e:.3f}",
                 f"{t_ph_e / t_bl_e:.2f}x",
                 f"HVPs {n_ph} / {n_bl}; max rel err {err_ph:.1e} / {err_bl:.1e}"))
    rows.append((f"top-{k}, both tol 1e-3 PyHessian rule (s)", f"{t_ph_e:.3f}", f"{t_bl_c:.3f}",
                 f"{t_ph_e / t_bl_c:.2f}x",
                 f"HVPs {n_ph} / {n_c}; max rel err {err_ph:.1e} / {err_c:.1e}"))
    goals.append((f"top-{k} >= 2x faster at equal accuracy",
                  t_ph_e / t_bl_e >= 2 and err_bl <= err_ph, f"{t_ph_e / t_bl_e:.2f}x"))
    print(f"reference top-{k} (Lanczos, bound 1e-8): {', '.join(f'{v:.5f}' for v in want)}")

    if a.loader_samples:
        rows += _loader_rows(a, model, crit, td, params, best)

    w = max(len(r[0]) for r in rows)
    print(f"\n{'':{w}}  {'pyhessian':>10}  {'batchlab':>10}  {'speedup':>8}  agreement / notes")
    for r in rows:
        print(f"{r[0]:{w}}  {r[1]:>10}  {r[2]:>10}  {r[3]:>8}  {r[4]}")
    print("\nwhere the time goes (torch.profiler, one product): " + "; ".join(notes))
    print()
    for name, ok, val in goals:
        print(f"{'PASS' if ok else 'MISS'}  {name}: {val}")
    print(f"\nload average after: {load()}")


def _matmul_profile(fn: Callable[[], Any], n: int) -> tuple[float, float]:
    """(matrix-multiply GFLOP per product, share of the wall time in matrix multiplies) for
    `fn`, which computes n products: the floor both libraries share when matmuls dominate."""
    from torch.profiler import profile

    fn()
    with profile(with_flops=True) as p:
        t0 = time.perf_counter()
        fn()
        wall = time.perf_counter() - t0
    mm = [e for e in p.key_averages() if e.key in ("aten::mm", "aten::bmm", "aten::addmm")]
    flops = sum(e.flops or 0 for e in mm)
    self_us = sum(e.self_cpu_time_total for e in mm)
    return flops / n / 1e9, self_us / 1e6 / wall


def _built(model: nn.Module, X: torch.Tensor, y: torch.Tensor, crit: nn.Module) -> C.Objective:
    obj = C.Objective(model, (X, y), criterion=crit)
    obj.cached_graph()
    return obj


def _loader_rows(a: argparse.Namespace, model: nn.Module, crit: nn.Module, td: Any,
                 params: list[torch.Tensor], best: Callable) -> list[tuple[str, ...]]:
    """Data larger than one batch: PyHessian's dataloader_hv_product vs batchlab chunked."""
    from pyhessian import hessian as PyHessian
    from torch.utils.data import DataLoader, TensorDataset

    n = min(a.loader_samples, len(td.y_train))
    loader = DataLoader(TensorDataset(td.x_train[:n], td.y_train[:n]), batch_size=a.loader_batch)
    model.zero_grad(set_to_none=True)
    h = PyHessian(model, crit, dataloader=loader, cuda=False)
    obj = C.Objective(model, loader, criterion=crit, mode="chunked")
    V = pyhessian_probes(params, 8, a.seed).to(obj.theta.dtype)
    vs = [p.view_as(q) for p, q in zip(V[0].split(obj.numels), params)]
    t_ph, (_, hv) = best(lambda: h.dataloader_hv_product(vs), a.repeats)
    t_bl, mine = best(lambda: obj.hvp(V[0]), a.repeats)
    t_many, _ = best(lambda: obj.hvp_many(V), a.repeats)
    diff = rel(mine, torch.cat([t.reshape(-1) for t in hv]))
    label = f"HVP, {n} samples in batches of {a.loader_batch} (s)"
    return [(label, f"{t_ph:.4f}", f"{t_bl:.4f}", f"{t_ph / t_bl:.2f}x", f"max rel diff {diff:.1e}"),
            (label.replace("(s)", "8 batched (s)"), f"{t_ph:.4f}", f"{t_many / 8:.4f}",
             f"{t_ph / (t_many / 8):.2f}x", "")]


def exact_trace(obj: C.Objective, block: int = 256) -> float:
    """tr(H) = sum_i e_i^T H e_i over every coordinate: the Hessian's diagonal, read off the
    full Hessian a column block at a time (dim products; only for small models)."""
    total = 0.0
    eye = torch.eye(obj.dim, dtype=obj.theta.dtype)
    for rows in range(0, obj.dim, block):
        E = eye[rows: rows + block]
        total += float((E * obj.hvp_many(E)).sum())
    return total


def _accuracy_setup(a: argparse.Namespace) -> tuple:
    """The model both accuracy modes measure: the MLP of `--hidden` after `--epochs` of SGD on
    mnist-5k, and its NLL objective on the first `--samples` training images."""
    if a.threads:
        torch.set_num_threads(a.threads)
    hidden = [int(h) for h in a.hidden.split(",")]
    print(f"load average before: {load()}; torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")
    res = train({"dataset": "mnist-5k", "hidden": hidden, "epochs": a.epochs, "batch_size": 64,
                 "lr": 0.01, "probes": [], "seed": a.seed})
    model = res.model.eval()
    td = get_data(res.config, torch.device("cpu"))
    X, y = td.x_train[: a.samples], td.y_train[: a.samples]
    crit = nn.NLLLoss()
    return hidden, model, X, y, crit, C.Objective(model, (X, y), criterion=crit)


def trace_accuracy(a: argparse.Namespace) -> None:
    """Time and Hessian-vector products to a relative error <= rtol at 95% over --runs seeds.

    Reference: the exact trace (every diagonal entry of the Hessian, dim products). batchlab's
    two estimators stop by themselves (variance rule, `hessian_trace(rtol=)`); each run's
    relative error against the reference is recorded, and a method meets the target when at
    least 95% of runs are within rtol. PyHessian has no variance rule: it gets the number of
    probes P = (1.96 sd / (rtol tr))^2 that a Hutchinson estimate needs for the same target (sd
    of z^T H z from the pooled Hutchinson probes, the same Rademacher distribution as its own),
    and its time is the measured time per probe of `trace(maxIter=m, tol=0)` times P."""
    hidden, model, X, y, crit, obj = _accuracy_setup(a)
    t0 = time.perf_counter()
    ref = exact_trace(obj)
    print(f"model: MLP 784-{'-'.join(map(str, hidden))}-10 ({obj.dim:,} params), {a.epochs} "
          f"epochs SGD; {len(y)} images; exact trace {ref:.6g} ({obj.dim:,} products, "
          f"{time.perf_counter() - t0:.1f} s); target |rel err| <= {a.rtol:g} in >= 95% of "
          f"runs\n")
    rows, pooled = [], []
    for method in ("hutchinson", "hutch++"):
        times, hvps, errs = [], [], []
        n_runs = a.hutchinson_runs or a.runs if method == "hutchinson" else a.runs
        for seed in range(n_runs):
            t0 = time.perf_counter()
            r = C.hessian_trace(model, (X, y), criterion=crit, method=method, rtol=a.rtol,
                                seed=seed, max_hvp=100_000)
            times.append(time.perf_counter() - t0)
            hvps.append(r.n_hvp)
            errs.append(abs(r.estimate - ref) / abs(ref))
            if method == "hutchinson":
                pooled += r.samples
        e = np.asarray(errs)
        rows.append((f"batchlab {method}", np.mean(times), np.mean(hvps),
                     float(np.mean(e <= a.rtol)), float(np.quantile(e, 0.95)),
                     f"measured, {n_runs} runs"))
    sd = float(np.std(pooled, ddof=1))
    P = int(math.ceil((1.96 * sd / (a.rtol * abs(ref))) ** 2))
    try:
        from pyhessian import hessian as PyHessian
    except ImportError:
        rows.append(("pyhessian hutchinson", math.nan, P, math.nan, math.nan,
                     "pyhessian not installed (pip install --no-deps pyhessian==0.1)"))
    else:
        warnings.filterwarnings("ignore", message="Using backward\\(\\) with create_graph")
        h = PyHessian(model, crit, data=(X, y), cuda=False)
        m = min(P, 64)

        def ph() -> list[float]:
            torch.manual_seed(a.seed)
            return h.trace(maxIter=m, tol=0.0)

        t, _ = best(ph, a.repeats)
        rows.append(("pyhessian hutchinson", t / m * P, P, 0.95, math.nan,
                     f"P from sd/tr = {sd / abs(ref):.3f}; {t / m * 1e3:.2f} ms/probe measured "
                     f"over {m} probes, x P"))
    base = rows[-1][1]
    print(f"{'method':22} {'time (s)':>9} {'HVPs':>8} {'within':>7} {'p95 err':>8} "
          f"{'vs pyhessian':>12}  notes")
    for name, t, n, cov, p95, note in rows:
        print(f"{name:22} {t:9.3f} {n:8.0f} {cov:7.2f} {p95:8.4f} {base / t:11.2f}x  {note}")
    print(f"\nload average after: {load()}")


PLAIN_GRID = [(16, 40), (32, 40), (64, 40), (64, 80), (128, 80)]  # (vectors, steps)
DEFLATED_GRID = [(20, 1, 10), (30, 1, 10), (40, 1, 20), (60, 1, 20), (80, 1, 40)]  # (k, v, s)


def density_accuracy(a: argparse.Namespace) -> None:
    """Time to a spectral density within --dtol of the exact one in >= 95% of runs.

    Reference: every eigenvalue of the model's Hessian (the full matrix from dim products, then
    a symmetric eigensolver; a small model, --hidden 8, so that it fits). Distance:
    Wasserstein-1 between the estimate's quadrature measure (before smoothing; it bounds the
    distance between smoothed densities for any sigma) and the exact spectral measure (1/n per
    eigenvalue), relative to mean |lambda| (the W1 distance from the exact measure to a point
    mass at 0, the natural scale of a spectrum piled up at zero). Each estimator runs over a
    grid of settings ordered by Hessian-vector products; its row is the cheapest setting whose
    runs (seeds) are within the target in >= 95% of cases."""
    hidden, model, X, y, crit, obj = _accuracy_setup(a)
    t0 = time.perf_counter()
    cache = a.spectrum_cache
    if cache and os.path.exists(cache) and len(np.load(cache)) == obj.dim:
        ev = np.load(cache)  # same model and data: train() and the data are deterministic
    else:
        H = np.zeros((obj.dim, obj.dim))
        eye = torch.eye(obj.dim, dtype=obj.theta.dtype)
        for r in range(0, obj.dim, 256):
            H[r: r + 256] = obj.hvp_many(eye[r: r + 256]).double().numpy()
        ev = np.linalg.eigvalsh((H + H.T) / 2)
        del H
        if cache:
            np.save(cache, ev)
    scale = float(np.abs(ev).mean())
    print(f"model: MLP 784-{'-'.join(map(str, hidden))}-10 ({obj.dim:,} params), {a.epochs} "
          f"epochs SGD; {len(y)} images; exact spectrum in {time.perf_counter() - t0:.0f} s: "
          f"[{ev[0]:.3g}, {ev[-1]:.3g}], mean |lambda| {scale:.4g}, {np.sum(np.abs(ev) > 1e-6)} "
          f"eigenvalues > 1e-6 in size; target W1 <= {a.dtol:g} x mean|lambda| in >= 95% of "
          f"runs\n", flush=True)
    ones = np.ones_like(ev)

    def rel_w1(atoms: np.ndarray, p: np.ndarray) -> float:
        return C.wasserstein1(atoms, p, ev, ones) / scale

    def batchlab(nv: int, m: int, k: int = 0) -> Callable[[int], tuple[np.ndarray, np.ndarray]]:
        def fn(seed: int) -> tuple[np.ndarray, np.ndarray]:
            d = C.spectral_density(model, (X, y), criterion=crit, n_vectors=nv, n_steps=m,
                                   deflate=k, seed=seed, n_grid=10)
            return d.measure()
        return fn

    def ph_slq(nv: int, m: int) -> Callable[[int], tuple[np.ndarray, np.ndarray]]:
        from pyhessian import hessian as PyHessian

        def fn(seed: int) -> tuple[np.ndarray, np.ndarray]:
            torch.manual_seed(seed)
            model.zero_grad(set_to_none=True)
            e, w = PyHessian(model, crit, data=(X, y), cuda=False).density(iter=m, n_v=nv)
            return np.concatenate(e), np.concatenate(w) / nv
        return fn

    def search(name: str, grid: list[tuple[str, int, Callable]], runs: int) -> tuple:
        """The cheapest setting meeting the target (or the last tried), with its figures."""
        row = None
        for label, hvps, fn in grid:
            times, errs = [], []
            for seed in range(runs):
                t0 = time.perf_counter()
                atoms, p = fn(seed)
                times.append(time.perf_counter() - t0)
                errs.append(rel_w1(atoms, p))
            e = np.asarray(errs)
            cov = float(np.mean(e <= a.dtol))
            print(f"  {name:20} {label:18} {hvps:6d} HVPs  {np.mean(times):7.3f} s  within "
                  f"{cov:.2f}  p95 {np.quantile(e, 0.95):.3f}", flush=True)
            row = (name, label, float(np.mean(times)), hvps, cov, float(np.quantile(e, 0.95)),
                   f"{runs} runs")
            if cov >= 0.95:
                break
        return row

    warnings.filterwarnings("ignore", message="Using backward\\(\\) with create_graph")
    _install_torch_eig()
    rows = [search("batchlab deflated", [(f"k={k}, {v} x {m}", k + v * m, batchlab(v, m, k))
                                         for k, v, m in DEFLATED_GRID], a.runs)]
    rows.append(search("batchlab slq", [(f"{v} x {m}", v * m, batchlab(v, m))
                                        for v, m in PLAIN_GRID], a.slq_runs))
    try:
        import pyhessian  # noqa: F401
    except ImportError:
        print("pyhessian not installed (pip install --no-deps pyhessian==0.1)")
    else:
        rows.append(search("pyhessian slq", [(f"{v} x {m}", v * m, ph_slq(v, m))
                                             for v, m in PLAIN_GRID], a.slq_runs))
    base = rows[-1][2]
    print(f"\n{'method':20} {'setting':18} {'time (s)':>9} {'HVPs':>6} {'within':>7} "
          f"{'p95 W1':>7} {'vs pyhessian':>12}  notes")
    for name, label, t, n, cov, p95, note in rows:
        print(f"{name:20} {label:18} {t:9.3f} {n:6d} {cov:7.2f} {p95:7.3f} {base / t:11.2f}x  "
              f"{note}")
    print(f"\nload average after: {load()}")


if __name__ == "__main__":
    main()
