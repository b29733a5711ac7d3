"""Run configuration: one validated, hashable object from which a run is a pure function.

`TrainConfig` is what the CLI, sweeps, experiments and users build. Its `key()` (a sha256 of the
canonical JSON of every field that changes the result, plus the dataset's content fingerprint)
is the results store's primary key: same key, same run, never computed twice.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from batchlab.errors import ConfigError
from batchlab.usercode import BUILTIN_MODELS, is_spec

# The names `optimizer` may take: the table behind `batchlab.nn.registry`, which is where an
# optimizer is registered (`register_optimizer(name, build)` adds its name here). Names only, so
# validating a config never imports torch or the nn layer; the built-ins are listed here
# because a config naming one must validate before batchlab.nn is imported.
_optimizer_names: dict[str, None] = dict.fromkeys(("sgd", "adam", "adamw", "lars", "cblr", "mclr"))
INITS = ("glorot", "torch", "kaiming")
# Edges of what a run can mean. A config beyond them is a typo or an attack, not an experiment:
# it is refused with one line instead of running for ever or overflowing.
MAX_EPOCHS = 100_000
MAX_LR = 1e32  # lr 1e30 is how the tests force a NaN (1e3..1e6 stay finite: dead ReLUs)
MAX_WEIGHT_DECAY = 1e3  # lr * wd > 2 already makes every step overshoot zero
MAX_WIDTH = 1 << 20
# the engine seeds its shuffle generator with seed * 1_000_003 + 7919, which must fit torch's
# signed 64-bit seed (and the store's SQLite INTEGER): larger seeds crashed the run
MAX_SEED = ((1 << 63) - 1 - 7919) // 1_000_003


class Phase(BaseModel):
    """One segment of a piecewise schedule: `epochs` epochs at this batch size and/or base lr.
    Fields left out inherit the run's `batch_size` / `lr`."""

    model_config = ConfigDict(extra="forbid")
    epochs: int = Field(gt=0, le=MAX_EPOCHS)
    batch_size: int | None = Field(default=None, gt=0)
    lr: float | None = Field(default=None, gt=0, le=MAX_LR, allow_inf_nan=False)


class TrainConfig(BaseModel):
    """Everything that determines a training run. Defaults are the reproduced study's settings
    (784-1024-1024-10 ReLU MLP, Glorot init, plain SGD at lr 0.01, inputs in [0, 1])."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    # data: a built-in dataset, or `data = "module:loader"` (a user's tensors; see
    # batchlab.usercode), which then replaces `dataset`/`data_dir`
    dataset: str = "mnist-5k"
    data: str | None = None
    data_dir: str | None = None
    normalize: Literal["unit", "standardize"] = "unit"
    val_fraction: float = Field(default=0.0, ge=0.0, lt=1.0, allow_inf_nan=False)
    max_train: int | None = Field(default=None, gt=0)
    max_test: int | None = Field(default=None, gt=0)
    # score the per-epoch train metrics on a fixed stratified subset of this many training
    # examples (None: all of them). Every epoch evaluates the train and test sets: on
    # mnist-24k that is a third of a run's FLOPs, and a 10,000-example subset measures train
    # accuracy to a standard error <= 0.005 (binomial at 50 %; 0.0014 at 98 %), the same
    # examples every epoch and in every arm, so differences between arms and epochs are paired.
    # 0: the train set is not scored at all (a run whose analysis reads no train metric, e.g.
    # steps-to-target's grid on a test target)
    train_eval_size: int | None = Field(default=None, ge=0)
    # evaluate every k-th epoch (and always the last, every checkpoint epoch and epoch 0);
    # the probes still run every epoch. For long runs compared with a short reference: a run
    # 16x as long as its reference evaluated every 16 epochs has the reference's resolution in
    # steps at a sixteenth of the evaluation cost (`evaluated_epochs`)
    eval_every: int = Field(default=1, ge=1, le=MAX_EPOCHS)
    # model: "mlp" (the study's), "cnn" (LeNet-sized) or "module:factory" (a user's nn.Module;
    # `hidden`, `init` and `batchnorm` describe the built-in models only)
    model: str = "mlp"
    hidden: list[int] = Field(default_factory=lambda: [1024, 1024])
    init: Literal["glorot", "torch", "kaiming"] = "glorot"
    batchnorm: bool = False
    ghost_batch_size: int | None = Field(default=None, gt=0)
    # optimization
    optimizer: str = "sgd"  # a registered name: see batchlab.nn.registry
    lr: float = 0.01
    momentum: float = Field(default=0.0, ge=0.0, lt=1.0, allow_inf_nan=False)
    nesterov: bool = False
    weight_decay: float = Field(default=0.0, ge=0.0, le=MAX_WEIGHT_DECAY, allow_inf_nan=False)
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = Field(default=1e-8, gt=0, allow_inf_nan=False)
    trust_coefficient: float = Field(default=0.001, gt=0, allow_inf_nan=False)
    curvature_every: int = Field(default=100, gt=0)
    discard_fraction: float = Field(default=0.0, ge=0.0, lt=1.0, allow_inf_nan=False)
    batch_size: int = 64
    epochs: int = Field(default=30, ge=0, le=MAX_EPOCHS)
    # schedules (see batchlab.engine.schedules)
    schedule: list[Phase] | None = None
    lr_multipliers: dict[int, float] = Field(default_factory=dict)
    warmup_epochs: float = Field(default=0.0, ge=0.0, le=MAX_EPOCHS, allow_inf_nan=False)
    decay: Literal["none", "step", "cosine"] = "none"
    decay_epochs: list[int] = Field(default_factory=list)
    decay_factor: float = Field(default=0.1, gt=0, allow_inf_nan=False)
    # the task (batchlab.task): "cross_entropy" (classification, the default), "mse",
    # "next_token" or "module:factory" returning an Objective
    loss: str = "cross_entropy"
    # mixed precision on the autograd engine: bf16 autocast, or fp16 autocast + GradScaler (GPU)
    amp: Literal["off", "bf16", "fp16"] = "off"
    # stopping ("*_metric": the loss's own metric, e.g. test_ppl for next_token, with its direction)
    target_metric: Literal["test_acc", "train_loss", "train_acc", "val_acc", "test_loss", "val_loss",
                           "train_metric", "test_metric", "val_metric"] | None = None
    target_value: float | None = Field(default=None, allow_inf_nan=False)
    # engine: "fused" = batchlab's lean manual-backward SGD path for MLPs (see fused.py),
    # "autograd" = generic torch.autograd + torch.optim; "auto" picks fused whenever it applies
    engine: Literal["auto", "autograd", "fused"] = "auto"
    # bookkeeping
    seed: int = Field(default=0, ge=0, le=MAX_SEED)
    device: str = "auto"
    checkpoint_epochs: list[int] = Field(default_factory=list)
    probes: list[str] = Field(default_factory=lambda: ["geometry"])

    @field_validator("lr")
    @classmethod
    def _lr_positive(cls, v: float) -> float:
        if not math.isfinite(v) or v <= 0:
            raise ValueError(f"lr must be a positive finite number, got {v}")
        if v > MAX_LR:
            raise ValueError(f"lr {v:g} is beyond any trainable value (at most {MAX_LR:g})")
        return v

    @field_validator("optimizer")
    @classmethod
    def _optimizer_registered(cls, v: str) -> str:
        if v not in _optimizer_names:
            raise ValueError(f"unknown optimizer {v[:80]!r}; registered: {', '.join(_optimizer_names)}")
        return v

    @field_validator("betas")
    @classmethod
    def _betas_in_range(cls, v: tuple[float, float]) -> tuple[float, float]:
        if not all(math.isfinite(b) and 0 <= b < 1 for b in v):
            raise ValueError(f"betas must be two numbers in [0, 1), got {list(v)}")
        return v

    @field_validator("device")
    @classmethod
    def _device_form(cls, v: str) -> str:
        if not re.fullmatch(r"auto|cpu|mps|cuda(:\d{1,3})?", v):
            raise ValueError(f"unknown device {v!r}; use auto, cpu, mps, cuda or cuda:N")
        return v

    @field_validator("model")
    @classmethod
    def _model_known(cls, v: str) -> str:
        if v not in BUILTIN_MODELS and not is_spec(v):
            raise ValueError(f"model must be {', '.join(BUILTIN_MODELS)} or module:factory, got {v!r}")
        return v

    @field_validator("data")
    @classmethod
    def _data_spec(cls, v: str | None) -> str | None:
        if v is not None and not is_spec(v):
            raise ValueError(f"data must be module:loader, got {v!r}")
        return v

    @field_validator("loss")
    @classmethod
    def _loss_known(cls, v: str) -> str:
        from batchlab.task import BUILTIN_LOSSES, OBJECT_PREFIX

        obj = v.startswith(OBJECT_PREFIX) and len(v) > len(OBJECT_PREFIX)
        if v not in BUILTIN_LOSSES and not is_spec(v) and not obj:
            raise ValueError(f"loss must be {', '.join(BUILTIN_LOSSES)} or module:factory, got {v!r}")
        return v

    @field_validator("batch_size")
    @classmethod
    def _bs_positive(cls, v: int) -> int:
        if v <= 0:
            raise ValueError(f"batch_size must be positive, got {v}")
        return v

    @field_validator("hidden")
    @classmethod
    def _hidden_positive(cls, v: list[int]) -> list[int]:
        if any(h <= 0 or h > MAX_WIDTH for h in v):
            raise ValueError(f"hidden widths must be between 1 and {MAX_WIDTH}")
        return v

    @field_validator("lr_multipliers")
    @classmethod
    def _mult_positive(cls, v: dict[int, float]) -> dict[int, float]:
        for k, m in v.items():
            if k < 1 or not math.isfinite(m) or m <= 0:
                raise ValueError("lr_multipliers maps epoch >= 1 to a positive factor")
        if math.prod(v.values()) > MAX_LR:  # else the lr overflows to inf mid-run
            raise ValueError(f"lr_multipliers multiply the lr by more than {MAX_LR:g}")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> TrainConfig:
        if self.schedule:
            # a schedule defines the run's length; `epochs` is derived from it
            object.__setattr__(self, "epochs", sum(p.epochs for p in self.schedule))
        if (self.target_metric is None) != (self.target_value is None):
            raise ValueError("target_metric and target_value go together")
        if self.decay == "step" and not self.decay_epochs:
            raise ValueError("decay='step' needs decay_epochs")
        if self.epochs > MAX_EPOCHS:
            raise ValueError(f"the schedule runs {self.epochs} epochs; at most {MAX_EPOCHS}")
        bad = [e for e in self.checkpoint_epochs if not 0 <= e <= self.epochs]
        if bad:
            raise ValueError(f"checkpoint_epochs {bad} are outside the run (0..{self.epochs})")
        bad = [e for e in self.decay_epochs if e < 1]
        if bad:
            raise ValueError(f"decay_epochs {bad} must be epochs >= 1")
        g = self.ghost_batch_size
        if g is not None and any(b % g for b in self.batch_sizes()):
            raise ValueError(f"ghost_batch_size {g} must divide the batch size "
                             f"({', '.join(map(str, sorted(set(self.batch_sizes()))))})")
        if self.model != "mlp" and (self.batchnorm or self.ghost_batch_size is not None):
            raise ValueError("batchnorm and ghost_batch_size apply to the built-in mlp only")
        if self.eval_every > 1 and self.target_metric is not None:
            raise ValueError("a target is checked at every evaluation: eval_every must be 1 "
                             "with target_metric/target_value")
        if self.amp != "off" and self.engine == "fused":
            raise ValueError("amp runs on the autograd engine (engine='fused' has no autocast)")
        return self

    # -- identity -------------------------------------------------------------------------
    _NON_SEMANTIC = ("data_dir", "device")
    # fields added after stores existed: left out of the key while at their default, so every
    # key computed before they existed is still found
    _NEW_DEFAULTS: dict[str, Any] = {"data": None, "loss": "cross_entropy", "amp": "off",
                                     "train_eval_size": None, "eval_every": 1}

    def semantic_dict(self) -> dict[str, Any]:
        """Fields that change the result (paths and device choice do not: the dataset enters
        the key through its content fingerprint instead)."""
        d = self.model_dump(mode="json")
        for k in self._NON_SEMANTIC:
            d.pop(k, None)
        for k, default in self._NEW_DEFAULTS.items():
            if d.get(k) == default:
                d.pop(k, None)
        if self.max_train is not None or self.max_test is not None:
            # subsets are stratified since this round (they were the first rows before): runs
            # stored with the old subsets must not be returned for the new ones
            d["subset"] = "stratified"
        return d

    @property
    def builtin_model(self) -> bool:
        """The study's MLP or the built-in CNN (not a user's factory)."""
        return self.model in BUILTIN_MODELS

    def key(self, data_fingerprint: str = "") -> str:
        payload = json.dumps(
            {"config": self.semantic_dict(), "data": data_fingerprint}, sort_keys=True
        )
        return hashlib.sha256(payload.encode()).hexdigest()

    def evaluates(self, epoch: int) -> bool:
        """Whether epoch `epoch` (0 = the initial weights) is evaluated (`eval_every`)."""
        return (epoch % self.eval_every == 0 or epoch == self.epochs
                or epoch in self.checkpoint_epochs or epoch == plateau_start(self.epochs))

    def evaluated_epochs(self) -> int:
        """How many evaluations the run makes, epoch 0 included (for plans: FLOPs, time)."""
        return sum(self.evaluates(e) for e in range(self.epochs + 1))

    def batch_sizes(self) -> list[int]:
        """Every batch size the run uses (for validation against the dataset size)."""
        if not self.schedule:
            return [self.batch_size]
        return [p.batch_size or self.batch_size for p in self.schedule]


def optimizer_names() -> tuple[str, ...]:
    """The registered optimizer names, in registration order."""
    return tuple(_optimizer_names)


def add_optimizer_name(name: str) -> None:
    """Make `name` a valid `TrainConfig.optimizer` (called by `nn.registry.register_optimizer`,
    which also holds its builder)."""
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_.:-]{1,64}", name):
        raise ConfigError(f"optimizer name must be 1-64 letters, digits or _.:-, got {name!r:.80}")
    _optimizer_names[name] = None


def remove_optimizer_name(name: str) -> None:
    """Undo `add_optimizer_name` (a test's optimizer, once the test is done)."""
    _optimizer_names.pop(name, None)


def plateau_start(last_epoch: int) -> int:
    """The epoch a run's convergence gate compares its last epoch with: a fifth of the run
    earlier (`experiments.schedules_exp.plateau_gain`). Every run evaluates it, so the gate
    spans the same epochs whatever `eval_every` is."""
    return last_epoch - max(1, round(last_epoch / 5))


def make_config(**fields: Any) -> TrainConfig:
    """Build a TrainConfig, turning validation failures into one-line ConfigErrors."""
    try:
        return TrainConfig(**fields)
    except ValidationError as e:
        raise ConfigError(format_validation_error(e)) from None


def format_validation_error(e: ValidationError) -> str:
    parts = []
    for err in e.errors():
        loc = ".".join(str(p) for p in err["loc"]) or "config"
        msg = err["msg"].removeprefix("Value error, ")
        parts.append(f"{loc}: {msg}")
    return "invalid config: " + "; ".join(parts)
