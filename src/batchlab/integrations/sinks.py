"""Sinks: where batchlab's measurements go besides its own store, so they sit next to the
training curves a practitioner already watches.

    from batchlab.integrations.sinks import TensorBoardSink, MLflowSink
    sink = TensorBoardSink("runs/gns")            # pip install 'batchlab[tensorboard]'
    sink.log({"gns/b_simple": gns.b_simple}, step)
    log_noise_history(sink, gns)                  # every measured step of a noise-scale monitor
    log_result(sink, result)                      # every epoch of a batchlab run
    log_recommendation(sink, report)              # `recommend`'s numbers

A sink has `log(metrics, step)` and `close()`; non-finite values are dropped (TensorBoard and
MLflow would store them as NaN points that break their plots, and "noise dominates" is +inf).
Each backend is an optional import with a one-line error naming the extra to install.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, Protocol

from batchlab.errors import BatchlabError


class Sink(Protocol):
    def log(self, metrics: Mapping[str, float], step: int) -> None: ...
    def close(self) -> None: ...


def finite(metrics: Mapping[str, Any]) -> dict[str, float]:
    """The finite numbers among `metrics` (bools and non-numbers left out)."""
    out = {}
    for k, v in metrics.items():
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            continue
        if math.isfinite(float(v)):
            out[k] = float(v)
    return out


class TensorBoardSink:
    """Scalars into a TensorBoard event directory (torch's SummaryWriter; needs the
    `tensorboard` package: `pip install 'batchlab[tensorboard]'`)."""

    def __init__(self, log_dir: str | Any, **writer_kw: Any) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as e:
            raise BatchlabError("TensorBoardSink needs tensorboard: pip install "
                                "'batchlab[tensorboard]'") from e
        self.writer = SummaryWriter(log_dir=str(log_dir), **writer_kw)

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        for k, v in finite(metrics).items():
            self.writer.add_scalar(k, v, global_step=int(step))

    def flush(self) -> None:
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class MLflowSink:
    """Metrics into the active MLflow run (started here when none is, and then ended by
    `close`). Needs `mlflow` or `mlflow-skinny`: `pip install 'batchlab[mlflow]'`.
    `tracking_uri`: where MLflow writes (its default otherwise)."""

    def __init__(self, *, tracking_uri: str | None = None, run_name: str | None = None,
                 experiment: str | None = None) -> None:
        try:
            import mlflow
        except ImportError as e:
            raise BatchlabError("MLflowSink needs MLflow: pip install 'batchlab[mlflow]'") from e
        self.mlflow = mlflow
        if tracking_uri is not None:
            mlflow.set_tracking_uri(tracking_uri)
        if experiment is not None:
            mlflow.set_experiment(experiment)
        self._owns = mlflow.active_run() is None
        self.run = mlflow.start_run(run_name=run_name) if self._owns else mlflow.active_run()

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        vals = {_mlflow_key(k): v for k, v in finite(metrics).items()}
        if vals:
            self.mlflow.log_metrics(vals, step=int(step), run_id=self.run.info.run_id)

    def close(self) -> None:
        if self._owns and self.mlflow.active_run() is not None:
            self.mlflow.end_run()


def _mlflow_key(k: str) -> str:
    """MLflow keys allow alphanumerics, _ - . space / only."""
    return "".join(c if c.isalnum() or c in "_-. /" else "_" for c in k)


class MemorySink:
    """Keeps what it is given (tests, or collecting numbers to plot)."""

    def __init__(self) -> None:
        self.rows: list[tuple[int, dict[str, float]]] = []

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        vals = finite(metrics)
        if vals:
            self.rows.append((int(step), vals))

    def close(self) -> None:
        """Nothing to release."""


def noise_metrics(gns: Any, prefix: str = "gns/") -> dict[str, float]:
    """The smoothed estimates of a `GradientNoiseScale` / `MicroBatchNoiseScale` (reading them
    copies them to the host: call it at logging steps only)."""
    return {f"{prefix}b_simple": gns.b_simple, f"{prefix}grad_sq": gns.grad_sq,
            f"{prefix}trace_sigma": gns.trace_sigma}


def log_noise_history(sink: Sink, gns: Any, prefix: str = "gns/") -> int:
    """Every measured step of a noise-scale monitor (raw and smoothed); returns the count."""
    n = 0
    for r in gns.history:
        sink.log({f"{prefix}b_simple": r.b_simple, f"{prefix}b_simple_raw": r.b_simple_raw,
                  f"{prefix}grad_sq": r.grad_sq_smooth,
                  f"{prefix}trace_sigma": r.trace_sigma_smooth}, r.step)
        n += 1
    return n


def log_result(sink: Sink, result: Any, prefix: str = "") -> int:
    """Every epoch row of a batchlab `TrainResult` (losses, metrics, probe values such as
    b_simple), at the row's optimizer step (its epoch when it has none)."""
    n = 0
    for row in result.epochs:
        step = row.get("steps", row.get("epoch", n))
        sink.log({f"{prefix}{k}": v for k, v in row.items() if k not in ("steps", "epoch")},
                 int(step) if isinstance(step, (int, float)) and math.isfinite(step) else n)
        n += 1
    return n


def log_recommendation(sink: Sink, report: Mapping[str, Any], prefix: str = "recommend/") -> None:
    """`recommend`'s headline numbers (step 0) and its B_simple history over the measurement
    run (at the steps it was measured)."""
    ns = report.get("noise_scale") or {}
    sink.log({f"{prefix}{k}": report.get(k) for k in (
        "recommended_batch_size", "recommended_batch_size_compute", "recommended_lr",
        "critical_batch_size", "predicted_steps", "predicted_seconds")}
        | {f"{prefix}b_simple": ns.get("b_simple")}, 0)
    for h in ns.get("history") or []:
        if h.get("step") is not None:
            sink.log({f"{prefix}b_simple_history": h.get("b_simple")}, int(h["step"]))


__all__ = ["MLflowSink", "MemorySink", "Sink", "TensorBoardSink", "finite", "log_noise_history",
           "log_recommendation", "log_result", "noise_metrics"]
