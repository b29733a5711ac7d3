"""Continuing a run from a shorter one: when run C's training is a prefix of run C' (the same
config up to C's length: the same batch size and lr at every step of C's epochs, the same seed,
model, optimizer, data, probes and target), C' does not retrain C's epochs. It starts from C's
state at C's end and trains only the rest; its record is the one training C' from scratch would
have written, bit for bit, except timing fields.

Why this is exact: a run is a pure function of its config, and everything the step loop carries
from one epoch to the next is saved with C (`State`): the weights, the optimizer's state
(momentum buffers, Adam's moments and step counts), the shuffle generator's state
(`setup.shuffle_generator`), the step and sample counters and each probe's state (a probe that
cannot save its state makes its runs not continuable). Evaluation draws from no random stream
and changes no weight, so C' may evaluate other epochs than C did (`eval_every`): the rows C'
takes from C are C's rows, with the metrics of epochs C' does not evaluate removed - C must
have evaluated every epoch C' evaluates within C's length (`prefix_reason` checks it).

`prefix_reason` says whether (and why not) a config is a prefix of another; `State` is what a
finished run keeps (`capture` in the loop, saved by `batchlab.runs.continuation`); `Resume` is
what a continued run starts from.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from typing import Any

import torch

from batchlab.config import TrainConfig
from batchlab.engine import schedules
from batchlab.engine.steppers import FusedStepper
from batchlab.errors import BatchlabError
from batchlab.probes.geometry import snapshot

# fields that say how long a run trains, how its lr and batch size change with time, and what
# it records along the way: they may differ between a prefix and the run continuing it (the
# schedules are then compared step by step). Every other field must be equal.
LENGTH_FIELDS = ("epochs", "schedule", "batch_size", "lr", "lr_multipliers", "warmup_epochs",
                 "decay", "decay_epochs", "decay_factor", "eval_every", "checkpoint_epochs")
# optimizers whose whole state is in `optimizer.state_dict()` (a layer-wise optimizer keeps
# more on the side: its runs are not continued)
CONTINUABLE_OPTIMIZERS = ("sgd", "adam", "adamw")
TIMING_FIELDS = ("seconds", "train_seconds_total", "eval_seconds", "vectorized_k",
                 "train_seconds")
"""Row and `final` fields that measure time or how a run was scheduled on the machine: the only
fields in which a continued run differs from one trained from scratch."""


def prefix_key(cfg: TrainConfig, data_fingerprint: str) -> str:
    """What a prefix and the run continuing it share: the config without its length and
    schedule fields (`LENGTH_FIELDS`), with the data's fingerprint. Candidates are looked up
    by it, then checked with `prefix_reason`."""
    d = cfg.semantic_dict()
    for k in LENGTH_FIELDS:
        d.pop(k, None)
    payload = json.dumps({"prefix": d, "data": data_fingerprint}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()


def continuable(cfg: TrainConfig) -> str | None:
    """Why runs of `cfg` cannot be continued (None: they can)."""
    if not cfg.builtin_model or cfg.data is not None:
        return "a user's model or data (its state may live outside batchlab)"
    if cfg.loss != "cross_entropy":
        return f"loss {cfg.loss} (continuation is for the built-in classification runs)"
    if cfg.optimizer not in CONTINUABLE_OPTIMIZERS:
        return f"optimizer {cfg.optimizer} keeps state outside its state_dict"
    if cfg.amp == "fp16":
        return "amp fp16 (the gradient scaler's state)"
    if cfg.epochs == 0:
        return "no epochs"
    return None


def prefix_reason(short: TrainConfig, long: TrainConfig, n_train: int) -> str | None:
    """None when `short`'s training is a prefix of `long`'s, else why not: fewer epochs, the
    same config apart from `LENGTH_FIELDS`, the same batch size and lr at every step of
    `short`'s epochs (the lr must not depend on the total length, as a cosine decay does), every
    epoch `long` evaluates within `short`'s length evaluated by `short` too, and every
    checkpoint `long` keeps there kept by `short` (or its init or last epoch)."""
    why = continuable(long)
    if why is not None:
        return why
    if short.epochs >= long.epochs:
        return "not shorter"
    if prefix_key(short, "") != prefix_key(long, ""):
        return "configs differ beyond their length"
    p_short, p_long = schedules.epoch_settings(short), schedules.epoch_settings(long)
    steady = (schedules.constant_within_epoch(short) and schedules.constant_within_epoch(long))
    for a, b in zip(p_short, p_long):
        if a.batch_size != b.batch_size:
            return f"batch size differs at epoch {a.epoch}"
        n = math.ceil(n_train / a.batch_size)
        for s in ([0] if steady else range(n)):
            if schedules.lr_at(short, a, s, n) != schedules.lr_at(long, b, s, n):
                return f"lr differs at epoch {a.epoch}, step {s}"
    missing = [e for e in range(short.epochs + 1) if long.evaluates(e) and not short.evaluates(e)]
    if missing:
        return f"epoch {missing[0]} is evaluated by the longer run only"
    ckpt = [e for e in long.checkpoint_epochs if e <= short.epochs
            and e not in short.checkpoint_epochs and e not in (0, short.epochs)]
    if ckpt:
        return f"checkpoint of epoch {ckpt[0]} not kept by the shorter run"
    return None


def eval_keys(data: Any) -> set[str]:
    """The row fields an evaluation writes (built-in classification on resident data)."""
    return {f"{name}_{m}" for name in data.eval_sets for m in ("loss", "acc")}


def rows_for(rows: list[dict[str, Any]], long: TrainConfig, data: Any) -> list[dict[str, Any]]:
    """The rows of the prefix as the longer run records them: the metrics of an epoch the longer
    run does not evaluate are dropped (and its `gap` is None), as the loop writes them."""
    keys = eval_keys(data)
    out = []
    for r in rows:
        if long.evaluates(int(r["epoch"])):
            out.append(dict(r))
        else:
            out.append({k: (None if k == "gap" else v) for k, v in r.items() if k not in keys})
    return out


@dataclass
class State:
    """What a run carries from one epoch to the next, at the end of its last epoch: enough to
    continue it exactly (`Resume`)."""

    epoch: int
    steps: int
    samples: int
    train_seconds: float
    engine: str
    weights: dict[str, torch.Tensor]
    optimizer: dict[str, torch.Tensor]  # tensors of the optimizer's state, flat names
    optimizer_scalars: dict[str, Any]  # its non-tensor entries (flat names)
    generator: torch.Tensor  # the shuffle generator's state (uint8)
    probes: list[dict[str, Any]]

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {f"model.{k}": v for k, v in self.weights.items()}
        out.update({f"optim.{k}": v for k, v in self.optimizer.items()})
        out["shuffle_generator"] = self.generator
        return out

    def meta(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "steps": self.steps, "samples": self.samples,
                "train_seconds": self.train_seconds, "engine": self.engine,
                "optimizer_scalars": self.optimizer_scalars, "probes": self.probes}

    @classmethod
    def from_parts(cls, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> State:
        def part(prefix: str) -> dict[str, torch.Tensor]:
            return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}

        return cls(epoch=int(meta["epoch"]), steps=int(meta["steps"]),
                   samples=int(meta["samples"]), train_seconds=float(meta["train_seconds"]),
                   engine=str(meta["engine"]), weights=part("model."),
                   optimizer=part("optim."), optimizer_scalars=dict(meta["optimizer_scalars"]),
                   generator=tensors["shuffle_generator"], probes=list(meta["probes"]))


@dataclass
class Resume:
    """Where a continued run starts: the prefix's state, its rows as the continued run records
    them (`rows_for`), its checkpoints the continued run keeps, and the run's initial weights
    (rebuilt from the seed, for the probes that measure distance from init)."""

    state: State
    rows: list[dict[str, Any]]
    init_state: dict[str, torch.Tensor] = field(default_factory=dict)  # set when built
    checkpoints: dict[int, dict[str, torch.Tensor]] = field(default_factory=dict)
    source: str | None = None  # the prefix's run id (provenance only)


# -- optimizer state, flat ------------------------------------------------------------------
def optimizer_state(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """A torch optimizer's per-parameter state as flat tensors `{i}.{name}` and scalars."""
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, Any] = {}
    for i, st in opt.state_dict()["state"].items():
        for name, v in st.items():
            if isinstance(v, torch.Tensor):
                tensors[f"{i}.{name}"] = v.detach().clone()
            else:
                scalars[f"{i}.{name}"] = v
    return tensors, scalars


def load_optimizer_state(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor],
                         scalars: dict[str, Any]) -> None:
    """Put back what `optimizer_state` took (into a freshly built optimizer of the config)."""
    state: dict[int, dict[str, Any]] = {}
    for flat, v in [*tensors.items(), *scalars.items()]:
        i, name = flat.split(".", 1)
        state.setdefault(int(i), {})[name] = v
    sd = opt.state_dict()
    sd["state"] = state
    opt.load_state_dict(sd)


# -- the stepper's side ------------------------------------------------------------------------
def capture(stepper: Any, pos: int, net: torch.nn.Module, gen: torch.Generator, probes: list[Any],
            epoch: int, steps: int, samples: int, train_seconds: float) -> State | None:
    """The state of the model at stacked position `pos` after its last epoch, for a longer
    run to continue from; None when one of its probes cannot save its state."""
    saved = [p.save_state() for p in probes]
    if any(p is None for p in saved):
        return None
    if isinstance(stepper, FusedStepper):
        stepper.sync()
        opt, scalars = stepper.impl.model_state(pos), {}
    elif stepper.optimizer is not None:
        opt, scalars = optimizer_state(stepper.optimizer)
    else:  # pragma: no cover - every stepper has one of the two
        return None
    return State(epoch=epoch, steps=steps, samples=samples, train_seconds=train_seconds,
                 engine=stepper.engine, weights=snapshot(net), optimizer=opt,
                 optimizer_scalars=scalars, generator=gen.get_state().clone(), probes=saved)


def restore_stepper(stepper: Any, states: list[State], k: int) -> None:
    """The prefixes' optimizer states into a pass's stepper (its modules already hold the
    prefixes' weights: a fused stepper stacks them when built)."""
    if len(states) != k or any(s.engine != stepper.engine for s in states):
        raise BatchlabError("a continued run must continue every model of its pass, on the "
                            "engine its prefix trained on")
    if isinstance(stepper, FusedStepper):
        stepper.impl.load_state([s.optimizer for s in states])
    elif stepper.optimizer is not None:
        load_optimizer_state(stepper.optimizer, states[0].optimizer, states[0].optimizer_scalars)
