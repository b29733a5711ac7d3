"""Run a `TrialRun` through the results store: every chunk of trials is a task (local worker
threads or Ray), every finished chunk a checksummed row of the store's `measurements` table,
keyed by the sha256 of its task (seeds, b, K, trial backend, ...), the weights, the data and the
device. So:

- a rerun reuses every chunk already measured and computes only the missing ones (an
  interrupted driver or a killed worker loses at most the chunks in flight);
- a rerun on other data or another checkpoint never reuses a row (their sha256 is in the key);
- a hand-edited or corrupted row, or a kept tensor file whose sha256 changed, is reported in
  one line and recomputed.

Chunk 0 of each batch size runs first: it fixes the histogram scale its later chunks use
(`gradcomp_stats`). Kept tensors are one .npy per (chunk, mode) under `tensor_dir`; read a batch
size's rows with `load_tensors`.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from batchlab.analysis import gradcomp as gc
from batchlab.analysis.gradcomp_trials import (
    ChunkTask,
    TrialRun,
    make_task,
    merge_chunks,
    run_chunk,
)
from batchlab.atomic import atomic_path
from batchlab.errors import BatchlabError
from batchlab.runs.measurements import (
    Measurements,
    files_of,
    spec_key,
    tensors_sha256,
    weights_sha256,
)
from batchlab.runs.store import Store
from batchlab.runs.tasks import make_pool

KIND = "gradcomp-chunk"
Line = Callable[[str], None]
Advance = Callable[[int, int], None]


def device_id(device: torch.device) -> str:
    """The device as the key records it (CPU kernels vs a named GPU)."""
    if device.type == "cuda":
        return f"cuda:{torch.cuda.get_device_name(device)}"
    return device.type


def run_trials(run: TrialRun, model: nn.Module, X: torch.Tensor, Y: torch.Tensor,
               store: Store, *, tensor_dir: Path | None = None, keep_tensors: bool = True,
               executor: str = "local", ray_address: str | None = None,
               progress: Line | None = None, advance: Advance | None = None,
               max_retries: int = 3) -> dict[int, dict[str, Any]]:
    """Run (or reuse) every batch size of `run`; returns {b: record}. A record holds, per
    mode, the per-trial norms, step losses and blow-up flags, the value statistics and (with
    `keep_tensors`) the chunk tensor files. `progress(line)` gets one-line messages (a
    recomputed damaged row, a finished batch size); `advance(b, trials)` is called as trials
    complete (stored trials count at once), for a progress bar.

    executor: `local` (parallel single-threaded worker threads on the CPU) or `ray` (one Ray
    task of one CPU per chunk, at `ray_address`; Ray tasks run on the CPU)."""
    run.validate()
    if keep_tensors and tensor_dir is None:
        raise BatchlabError("keep_tensors needs a tensor directory")
    if executor == "ray" and X.device.type != "cpu":
        X, Y = X.cpu(), Y.cpu()
        model = model.cpu()
    device = X.device
    say = progress or (lambda line: None)
    weights = weights_sha256(model)
    for name, t in model.state_dict().items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise BatchlabError(f"the checkpoint has NaN or infinite weights ({name}); "
                                "refusing to measure gradients on it")
    data = tensors_sha256(X, Y)
    ctx = _Ctx(run, Measurements(store, warn=say), weights, data, device_id(device),
               keep_tensors, Path(tensor_dir) / run.name if tensor_dir else None)
    chunks = {b: run.chunks(b, device) for b in run.batch_sizes}
    done: dict[int, dict[int, dict[str, Any]]] = {b: {} for b in run.batch_sizes}
    scales: dict[int, dict[str, float]] = {}

    def stored(b: int, i: int) -> dict[str, Any] | None:
        got = ctx.lookup(_task(run, b, chunks[b][i], device, scales.get(b)))
        if got is not None:
            done[b][i] = got
            if advance:
                advance(b, got["stop"] - got["start"])
        return got

    todo: list[tuple[int, int]] = []  # (b, chunk index) to submit now
    for b in run.batch_sizes:
        first = stored(b, 0)
        if first is None:
            todo.append((b, 0))
            continue
        scales[b] = _scales(first)
        todo += [(b, i) for i in range(1, len(chunks[b])) if stored(b, i) is None]

    workers = run.threads or gc.default_workers(device)
    pool = None
    if todo:
        pool = make_pool(executor, workers=workers, cpu=device.type == "cpu",
                         ray_address=ray_address, max_retries=max_retries)
    try:
        pending: dict[Any, tuple[int, int, ChunkTask]] = {}
        if pool is not None:
            m_arg = pool.shared(f"model:{weights}", model)
            x_arg = pool.shared(f"X:{data}", X)
            y_arg = pool.shared(f"Y:{data}", Y)

            def submit(b: int, i: int) -> None:
                task = _task(run, b, chunks[b][i], device, scales.get(b))
                pending[pool.submit(run_chunk, task, m_arg, x_arg, y_arg, keep_tensors)] = \
                    (b, i, task)

            for b, i in todo:
                submit(b, i)
            while pending:
                handle, (payload, tensors) = pool.next_done()
                b, i, task = pending.pop(handle)
                done[b][i] = ctx.save(task, payload, tensors)
                if advance:
                    advance(b, task.stop - task.start)
                if i == 0:
                    scales[b] = _scales(payload)
                    for j in range(1, len(chunks[b])):
                        if stored(b, j) is None:
                            submit(b, j)
                if len(done[b]) == len(chunks[b]):
                    secs = sum(p["seconds"] for p in done[b].values())
                    say(f"{run.name} b={b}: {secs:.1f}s ({len(run.seeds)} trials)")
    except BaseException:
        if pool is not None:
            pool.cancel_all()  # every stored chunk is whole; a rerun resumes from them
        raise
    finally:
        if pool is not None:
            pool.close()
    return {b: merge_chunks([done[b][i] for i in range(len(chunks[b]))], run.modes,
                            len(run.seeds), keep_tensors) for b in run.batch_sizes}


def _task(run: TrialRun, b: int, rng: tuple[int, int], device: torch.device,
          scales: dict[str, float] | None) -> ChunkTask:
    start, stop = rng
    return make_task(run, b, start, stop, device, None if start == 0 else scales)


def _scales(payload: dict[str, Any]) -> dict[str, float]:
    return {m: float(v["values"]["scale"]) for m, v in payload["modes"].items()}


class _Ctx:
    """The store side of one run_trials call: look chunks up, save them with their files."""

    def __init__(self, run: TrialRun, meas: Measurements, weights: str, data: str,
                 device: str, keep: bool, tdir: Path | None) -> None:
        self.run, self.meas, self.keep, self.tdir = run, meas, keep, tdir
        self.weights, self.data, self.device = weights, data, device

    def spec(self, task: ChunkTask) -> dict[str, Any]:
        return task.spec(self.weights, self.data, self.device)

    def lookup(self, task: ChunkTask) -> dict[str, Any] | None:
        spec = self.spec(task)
        got = self.meas.get(KIND, spec)
        if got is None:
            return None
        files = files_of(self.meas.store, KIND, spec)
        if self.keep and set(files) != set(task.modes):
            return None  # measured without tensors: compute again, keeping them
        got["files"] = files
        return got

    def save(self, task: ChunkTask, payload: dict[str, Any],
             tensors: dict[str, np.ndarray]) -> dict[str, Any]:
        files: dict[str, Path] = {}
        if self.keep and self.tdir is not None:
            tag = self.meas_key(task)[:8]
            for m, arr in tensors.items():
                path = self.tdir / f"{m}_b{task.b:04d}_t{task.start:05d}-{task.stop:05d}_{tag}.npy"
                with atomic_path(path) as tmp, open(tmp, "wb") as f:
                    np.save(f, arr)
                files[m] = path
        self.meas.put(KIND, self.spec(task), payload, files)
        return {**payload, "files": {m: str(p.resolve()) for m, p in files.items()}}

    def meas_key(self, task: ChunkTask) -> str:
        return spec_key(KIND, self.spec(task))


def load_tensors(rec: dict[str, Any], mode: str, width: int | None = None) -> np.ndarray:
    """A batch size's kept rows of one mode, [trials, width] float32, from its chunk files
    (verified against their sha256 when the record was loaded from the store)."""
    files = rec["modes"][mode].get("files")
    if not files or any(f is None for f in files):
        raise BatchlabError(f"no tensors were kept for b={rec['b']} {mode}")
    parts = []
    for f in files:
        try:
            parts.append(np.load(f))
        except (OSError, ValueError, EOFError) as e:
            raise BatchlabError(f"tensor file {f} is unreadable ({e}); rerun to recompute it"
                                ) from None
    arr = np.concatenate(parts)
    if arr.shape[0] != rec["trials"] or (width is not None and arr.shape[1] != width):
        raise BatchlabError(f"tensors of b={rec['b']} {mode} have shape {arr.shape}, expected "
                            f"({rec['trials']}, {width})")
    return arr
