"""Which engine trains a run: the one place that decides it.

The loop's stepper factory (`steppers.make_stepper`), the vectorization planner
(`vectorized.ineligible`), the throughput measurements (`analysis.throughput`) and the
`--plan` probe (`experiments.plan_timer`) all ask `choose_engine`, so a plan or a throughput
figure times the step a run really takes (they used to decide it four times, and disagreed on
amp, non-classification losses and batchnorm modules).

Kinds: "fused" (`FusedStepper`: batchlab's manual-backward plain/momentum SGD on its MLP) and
"autograd" (`AutogradStepper`: any module, optimizer, loss or probe). The deferred low-rank
pass (`engine/deferred.py`) is not a training engine: gradient competition picks it itself.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from torch import nn

from batchlab.config import TrainConfig
from batchlab.errors import ConfigError
from batchlab.nn.models import MLP
from batchlab.probes import Probe

EngineKind = Literal["fused", "autograd"]


@dataclass(frozen=True)
class EngineChoice:
    """The engine a run trains on and why (`reason` is a phrase for logs and errors)."""

    kind: EngineKind
    reason: str

    @property
    def fused(self) -> bool:
        return self.kind == "fused"

    def __str__(self) -> str:
        return f"{self.kind}: {self.reason}"


def _has_batchnorm(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def _fused_blocker(cfg: TrainConfig, probes: Sequence[Probe] = (), *,
                   model: nn.Module | None = None, streamed: bool = False,
                   loss_object: bool = False) -> str | None:
    """Why the fused stepper cannot train this run (None: it can). Without `model` the config
    names the model (planning, before a module exists); with it, the module itself must be
    batchlab's MLP without batchnorm layers (the fused backward has no batchnorm: a user's MLP
    with one would otherwise be trained as if it had none)."""
    if cfg.optimizer != "sgd":
        return f"optimizer {cfg.optimizer} runs on autograd"
    if model is None:
        if cfg.model != "mlp":
            return f"model {cfg.model} is not batchlab's MLP"
    elif not isinstance(model, MLP):
        return f"the model ({type(model).__name__}) is not batchlab's MLP"
    if cfg.batchnorm or (model is not None and _has_batchnorm(model)):
        return "batchnorm runs on autograd"
    if cfg.discard_fraction > 0:
        return "discard_fraction > 0 runs on autograd"
    if cfg.loss != "cross_entropy":
        return f"loss {cfg.loss} runs on autograd"
    if cfg.amp != "off":
        return "amp runs on autograd"
    if streamed:
        return "streamed data runs on autograd"
    if loss_object:
        return "a loss object runs on autograd"
    grad = [p.name for p in probes if p.needs_grad]
    if grad:
        return f"probe {grad[0]} needs gradients (autograd)"
    return None


def choose_engine(cfg: TrainConfig, probes: Sequence[Probe] = (), *,
                  model: nn.Module | None = None, streamed: bool = False,
                  loss_object: bool = False) -> EngineChoice:
    """The engine `cfg` trains on: fused when it can and `cfg.engine` does not ask for
    autograd. `probes`: the run's probe objects (one needing per-step gradients keeps it on
    autograd); `model`: the built module when there is one; `streamed`: data that arrives in
    batches; `loss_object`: the loss is a Python object rather than a config name.
    engine='fused' for a run the fused path cannot do is a one-line ConfigError."""
    blocker = _fused_blocker(cfg, probes, model=model, streamed=streamed, loss_object=loss_object)
    if blocker is not None:
        if cfg.engine == "fused":
            raise ConfigError("engine='fused' needs plain/momentum SGD on an MLP without "
                              f"batchnorm, discarding or gradient probes ({blocker})")
        return EngineChoice("autograd", blocker)
    if cfg.engine == "autograd":
        return EngineChoice("autograd", "engine='autograd' was asked for")
    sgd = "momentum SGD" if cfg.momentum > 0 else "plain SGD"
    return EngineChoice("fused", f"{sgd} on batchlab's MLP")


def refusal_or_choice(cfg: TrainConfig, probes: Sequence[Probe] = (), *,
                      model: nn.Module | None = None, streamed: bool = False,
                      loss_object: bool = False) -> EngineChoice:
    """`choose_engine`, with an engine='fused' refusal returned as an autograd choice whose
    reason is the refusal (for planners and a vectorized pass, which report why a config cannot
    be stacked; training it alone raises the refusal)."""
    try:
        return choose_engine(cfg, probes, model=model, streamed=streamed,
                             loss_object=loss_object)
    except ConfigError as e:
        return EngineChoice("autograd", str(e))
