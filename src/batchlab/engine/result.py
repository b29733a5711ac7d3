"""What the engine hands back: one `TrainResult` per trained model, and the progress
callbacks (`Reporter`) it calls while training. Storing results is the runs layer's job."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from batchlab.atomic import jsonable
from batchlab.config import TrainConfig
from batchlab.nn.checkpoint import load_state, read_meta


@dataclass
class TrainResult:
    """A run: per-epoch rows (epoch 0 = the initial state), the `final` summary, the trained
    module and in-memory checkpoints. A crash inside training is a result too: status
    `failed`, `error` its one-line text and `exception` the exception itself (not stored)."""

    run_id: str
    key: str
    config: TrainConfig
    status: str  # completed | diverged | failed
    epochs: list[dict[str, Any]]
    final: dict[str, Any]
    model: nn.Module | None = None
    init_state: dict[str, torch.Tensor] | None = None
    checkpoints: dict[int, dict[str, torch.Tensor]] = field(default_factory=dict)
    artifacts: dict[str, tuple[str, str]] = field(default_factory=dict)
    env: dict[str, Any] = field(default_factory=dict)
    wall_seconds: float = 0.0
    error: str | None = None
    cached: bool = False
    exception: BaseException | None = field(default=None, repr=False, compare=False)
    # the state at its end when asked to keep it (`engine.continuation`): saved with the run
    state: Any = field(default=None, repr=False, compare=False)

    def checkpoint(self, epoch: int) -> dict[str, torch.Tensor]:
        """Weights saved at `epoch` (0 = init), from memory or the store's safetensors file; the
        last epoch's also from the run's kept end state."""
        if epoch in self.checkpoints:
            return self.checkpoints[epoch]
        name = f"epoch{epoch:04d}"
        if name in self.artifacts:
            return load_state(Path(self.artifacts[name][0]), sha256=self.artifacts[name][1])
        # a run that kept its end state (`engine.continuation`) holds its last epoch's weights
        # there, so a run shared with another experiment serves them without a checkpoint
        if self.state is not None and self.state.epoch == epoch:
            return dict(self.state.weights)
        if "state" in self.artifacts:
            from batchlab.engine.continuation import State

            path, sha = self.artifacts["state"]
            meta = read_meta(Path(path))
            if int(meta.get("epoch", -1)) == epoch:
                return State.from_parts(load_state(Path(path), sha256=sha), meta).weights
        raise KeyError(f"run {self.run_id} has no checkpoint at epoch {epoch}; "
                       f"add it to checkpoint_epochs")

    def metric(self, split: str = "test") -> float | None:
        """The run's evaluation metric on `split` at its end: test accuracy for classification,
        the loss's own metric otherwise (`final["metric"]` names it; mse, ppl, ...). Runs stored
        before objectives existed are classification."""
        name = self.final.get("metric", "acc")
        v = self.final.get(f"{split}_{name}")
        return float(v) if isinstance(v, (int, float)) else None

    def to_json(self) -> dict[str, Any]:
        return {
            "run_id": self.run_id,
            "status": self.status,
            "config": self.config.model_dump(mode="json"),
            "epochs": [jsonable(e) for e in self.epochs],
            "final": jsonable(self.final),
            "error": self.error,
            "cached": self.cached,
        }


class Reporter:
    """Progress callbacks (the CLI renders them with rich); all optional."""

    def start(self, cfg: TrainConfig, total_epochs: int) -> None: ...
    def steps(self, done: int, total: int) -> None: ...
    def epoch(self, metrics: dict[str, Any]) -> None: ...
    def finish(self) -> None: ...
