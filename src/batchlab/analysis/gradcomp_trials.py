"""Gradient-competition trials as tasks: the design of a set of trials (`TrialRun`), its split
into chunks of trials per batch size, the key that identifies a chunk's result, and the task
body (`run_chunk`) that computes one chunk anywhere (a local worker thread or a Ray worker).

A chunk is a pure function of its `ChunkTask` (recorded trial seeds, batch size, modes, K,
trial backend, learning rate, blow-up limit, the histogram scales from chunk 0) and of the weights
and data, which the key names by sha256. On the CPU it runs with one intra-op thread, so its
numbers are bit-identical wherever it runs.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from batchlab.analysis import gradcomp as gc
from batchlab.analysis.gradcomp_stats import ValueStats, blown, finite_list, rms_scale
from batchlab.errors import ConfigError

CHUNK_TRIALS = 16  # trials per chunk (rounded up to a multiple of K): the resume granularity
FORMAT = 3  # bump when a chunk's payload changes meaning: old rows are then never reused


@dataclass
class TrialRun:
    """The design of one set of trials on one checkpoint. `sample_seeds[t]` is None for
    fresh-sample trials, else the seed of trial t's fixed sample set."""

    name: str
    seeds: list[int]
    sample_seeds: list[int | None]
    batch_sizes: list[int]
    modes: list[str]
    n_samples: int = 1024
    lr: float = 0.01
    blowup_loss: float = 100.0
    k: int | None = None
    threads: int | None = None  # CPU: parallel single-threaded workers (default: torch's)
    backend: str | None = None  # None: `default_backend(device)`; the option `engine`
    chunk: int | None = None  # trials per chunk (default CHUNK_TRIALS)

    def validate(self) -> None:
        gc.validate_batch_sizes(self.batch_sizes, self.n_samples)
        unknown = [m for m in self.modes if m not in gc.MODES]
        if unknown:
            raise ConfigError(f"unknown modes {unknown}; choose from {', '.join(gc.MODES)}")
        if self.backend is not None and self.backend not in gc.BACKENDS:
            raise ConfigError(f"unknown trial backend {self.backend!r}; choose from "
                              f"{', '.join(gc.BACKENDS)}")
        if len(self.sample_seeds) != len(self.seeds):
            raise ConfigError("one sample seed (or None) per trial seed is needed")
        for key in ("k", "threads", "chunk"):
            v = getattr(self, key)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise ConfigError(f"{key} must be a positive integer, got {v!r}")

    def k_at(self, b: int, device: torch.device) -> int:
        return self.k or gc.default_k(b, device)

    def chunks(self, b: int, device: torch.device) -> list[tuple[int, int]]:
        """(start, stop) trial ranges at batch size b; a multiple of K trials each."""
        k = self.k_at(b, device)
        size = k * math.ceil((self.chunk or CHUNK_TRIALS) / k)
        T = len(self.seeds)
        return [(s, min(s + size, T)) for s in range(0, T, size)]

    def steps(self, b: int) -> int:
        """SGD steps of one trial at batch size b (remainder rule: one smaller last step)."""
        return math.ceil(self.n_samples / b)


@dataclass(frozen=True)
class ChunkTask:
    """Everything one chunk's numbers depend on, besides the weights and the data."""

    b: int
    start: int
    stop: int
    seeds: tuple[int, ...]
    sample_seeds: tuple[int | None, ...]
    modes: tuple[str, ...]
    n_samples: int
    lr: float
    blowup_loss: float
    k: int
    backend: str
    scales: tuple[tuple[str, float], ...] | None  # None: chunk 0 measures them

    def spec(self, weights: str, data: str, device: str) -> dict[str, Any]:
        """The store key's spec: this task, the weights' and data's sha256, the device."""
        d = asdict(self)
        d["engine"] = d.pop("backend")  # its stored name: every chunk key has it
        d.update(format=FORMAT, weights=weights, data=data, device=device,
                 **({"rank": gc.DEFERRED_RANK} if self.backend == "deferred" else {}))
        return d


def make_task(run: TrialRun, b: int, start: int, stop: int, device: torch.device,
              scales: dict[str, float] | None) -> ChunkTask:
    return ChunkTask(
        b=b, start=start, stop=stop, seeds=tuple(int(s) for s in run.seeds[start:stop]),
        sample_seeds=tuple(None if s is None else int(s)
                           for s in run.sample_seeds[start:stop]),
        modes=tuple(run.modes), n_samples=run.n_samples, lr=float(run.lr),
        blowup_loss=float(run.blowup_loss), k=run.k_at(b, device),
        backend=run.backend or gc.default_backend(device),
        scales=None if scales is None else tuple(sorted(scales.items())))


def run_chunk(task: ChunkTask, model: nn.Module, X: torch.Tensor, Y: torch.Tensor,
              keep_tensors: bool) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Compute one chunk: (payload, tensors). The payload holds, per mode, the per-trial norms,
    largest step losses, blow-up flags and the value statistics; `tensors` the [trials,
    width] float32 rows per mode when `keep_tensors` (else empty)."""
    if X.device.type == "cpu":
        torch.set_num_threads(1)  # a chunk's numbers never depend on where it runs
    t0 = time.perf_counter()
    idx = torch.stack([gc.sample_indices(len(Y), task.n_samples, s, ss)
                       for s, ss in zip(task.seeds, task.sample_seeds)]).to(X.device)
    rows: dict[str, list[np.ndarray]] = {m: [] for m in task.modes}
    losses: dict[str, list[np.ndarray]] = {m: [] for m in task.modes}
    for s in range(0, len(idx), task.k):
        ids = idx[s:s + task.k]
        res = gc.run_trial_block(model, X[ids], Y[ids], task.b, task.lr, list(task.modes),
                                 task.backend)
        for m in task.modes:
            rows[m].append(res[m].to(torch.float32).cpu().numpy())
            key = "max_loss/sum" if m == "sum-loss" else "max_loss/mean"
            losses[m].append(res[key].to(torch.float64).cpu().numpy())
    scales = dict(task.scales) if task.scales is not None else {}
    payload: dict[str, Any] = {"b": task.b, "start": task.start, "stop": task.stop,
                               "k": task.k, "engine": task.backend, "modes": {}}
    tensors: dict[str, np.ndarray] = {}
    for m in task.modes:
        g = np.concatenate(rows[m])
        ml = np.concatenate(losses[m])
        norms = np.linalg.norm(g.astype(np.float64), axis=1)
        flags = blown(norms, ml, task.blowup_loss)
        stats = ValueStats(scale=scales.get(m) or rms_scale(g[~flags]))
        stats.update(g[~flags])
        payload["modes"][m] = {"norms": finite_list(norms), "max_loss": finite_list(ml),
                               "blowup": [bool(v) for v in flags], "values": stats.to_json()}
        if keep_tensors:
            tensors[m] = g
    payload["seconds"] = time.perf_counter() - t0
    return payload, tensors


def merge_chunks(payloads: Sequence[dict[str, Any]], modes: Sequence[str],
                 trials: int, keep_tensors: bool) -> dict[str, Any]:
    """One batch size's record from its chunks (in trial order): per-trial lists joined,
    value statistics merged exactly, seconds summed (worker seconds, not wall time)."""
    first = payloads[0]
    rec: dict[str, Any] = {"b": first["b"], "k": first["k"], "engine": first["engine"],
                           "trials": trials, "keep_tensors": keep_tensors,
                           "seconds": float(sum(p["seconds"] for p in payloads)), "modes": {}}
    for m in modes:
        parts = [p["modes"][m] for p in payloads]
        stats = ValueStats.from_json(parts[0]["values"])
        for part in parts[1:]:
            stats = stats.merge(ValueStats.from_json(part["values"]))
        rec["modes"][m] = {
            "norms": [v for p in parts for v in p["norms"]],
            "max_loss": [v for p in parts for v in p["max_loss"]],
            "blowup": [v for p in parts for v in p["blowup"]],
            "values": stats.to_json(),
            "files": [p.get("files", {}).get(m) for p in payloads] if keep_tensors else None,
        }
    return rec
