"""The task contract: what a run learns (an `Objective`) and from what (a data source, `Data`).

An **Objective** is a loss on the model's outputs plus an evaluation metric:

- `loss(outputs, target)` - the mean loss of a batch (a 0-d tensor). `target` is the second
  part of the batch `(x, target)` the data yields: whatever the loss needs besides the outputs
  (class labels, regression targets, next tokens). An objective is also callable as its loss,
  so it plugs into every measurement that takes a `loss_fn` (`batchlab.noise`, curvature).
- `per_example(outputs, target)` - the per-example losses `[B]` when the loss is a mean over
  examples (discarding, streamed evaluation and per-example noise estimators use them), or
  None.
- `metric_terms(outputs, target)` - the metric's (sum, count) over a batch, so evaluation adds
  batches up without holding a data set; `finish(mean)` turns the mean into the metric
  (perplexity is exp of the mean token NLL, capped at exp(80)). `metric_name` and `higher_is_better` say what it
  is and which way is better (targets and "best" values follow it).

Built in: `Classification` ("cross_entropy": NLL on log-probabilities + accuracy; a LogSoftmax
is appended to a user's model, which leaves log-probabilities as they are, so logits work too),
`Regression` ("mse": mean squared error, metric mse) and `NextToken` ("next_token": token
cross-entropy for a causal language model, metric perplexity). `objective_for` also takes
`module:factory` (the factory returns an Objective) and, from Python, an Objective or a plain
`loss(outputs, target)` callable (metric: its mean, lower is better).

A **data source** (`Data`) is tensors `(X, y)` (kept resident: the fast path), a map-style
`torch.utils.data.Dataset`, an `IterableDataset` (streamed, never materialised) or a loader
factory `(batch_size, seed) -> iterable of (x, y) batches`; see `batchlab.data.stream` for how
the engine batches, evaluates and fingerprints the non-tensor kinds. Integer inputs stay
integer (token ids for an `nn.Embedding`).
"""

from __future__ import annotations

import hashlib
import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from batchlab.errors import BatchlabError, ConfigError, DataError

BUILTIN_LOSSES = ("cross_entropy", "mse", "next_token")
OBJECT_PREFIX = "object:"
"""`TrainConfig.loss` of an objective passed as a Python object (`train(loss=obj)`): the prefix
and the object's identity, so the store key changes with it."""


class Objective:
    """Base class: subclass and override `loss` (and `per_example`, `metric_terms` where the
    defaults do not fit). The defaults: no per-example losses; the metric is the mean loss."""

    name: str = "objective"
    metric_name: str = "loss"
    higher_is_better: bool = False
    log_probs: bool = False
    """True: the loss reads outputs as log-probabilities (user models get a LogSoftmax)."""
    accuracy: bool = False
    """True: the metric is a classification accuracy (experiments that need one check this)."""

    def loss(self, outputs: torch.Tensor, target: Any) -> torch.Tensor:
        raise NotImplementedError

    def per_example(self, outputs: torch.Tensor, target: Any) -> torch.Tensor | None:
        return None

    def metric_terms(self, outputs: torch.Tensor, target: Any) -> tuple[torch.Tensor, torch.Tensor]:
        n = _batch_len(target, outputs)
        per = self.per_example(outputs, target)
        total = per.sum() if per is not None else self.loss(outputs, target) * n
        return total.detach().float(), torch.tensor(float(n), device=outputs.device)

    def finish(self, mean: torch.Tensor) -> torch.Tensor:
        """The metric from the mean of its terms (a device tensor: no host sync)."""
        return mean

    def check_targets(self, y: torch.Tensor, part: str) -> torch.Tensor:
        """Validated targets of resident tensor data (one-line DataError otherwise)."""
        return y

    def check_outputs(self, outputs: Any, target: Any) -> None:
        """A one-line DataError when the model's outputs on two examples cannot be scored."""
        if not isinstance(outputs, torch.Tensor):
            raise DataError(f"the model must return a tensor, got {type(outputs).__name__}")
        try:
            v = self.loss(outputs.float(), target)
        except Exception as e:
            raise DataError(f"loss {self.name} cannot score the model's outputs of shape "
                            f"{tuple(outputs.shape)} against targets of shape "
                            f"{tuple(getattr(target, 'shape', ()))}: {type(e).__name__}: "
                            f"{_first_line(e)}") from None
        if not isinstance(v, torch.Tensor) or v.dim() != 0:
            raise DataError(f"loss {self.name} must return a 0-d tensor (the batch mean)")

    def identity(self) -> str:
        """What the store key records for this objective."""
        return self.name

    def __call__(self, outputs: torch.Tensor, target: Any) -> torch.Tensor:
        return self.loss(outputs, target)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(metric={self.metric_name!r})"


class Classification(Objective):
    """Class labels `[B]` against `[B, C]` log-probabilities: NLL, metric accuracy."""

    name, metric_name, higher_is_better, log_probs, accuracy = "cross_entropy", "acc", True, True, True

    def loss(self, outputs: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.nll_loss(outputs, target)

    def per_example(self, outputs: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.nll_loss(outputs, target, reduction="none")

    def metric_terms(self, outputs: torch.Tensor, target: torch.Tensor
                     ) -> tuple[torch.Tensor, torch.Tensor]:
        return ((outputs.argmax(1) == target).sum().float(),
                torch.tensor(float(len(target)), device=outputs.device))

    def check_targets(self, y: torch.Tensor, part: str) -> torch.Tensor:
        if y.dim() != 1:
            raise DataError(f"{part} y must be 1-d class labels, got shape {tuple(y.shape)} "
                            f"(other targets: --loss mse or next_token)")
        if y.dtype == torch.bool or y.dtype.is_complex or (
                y.dtype.is_floating_point and not torch.equal(y, y.round())):
            raise DataError(f"{part} y must hold integer class labels, got dtype {y.dtype} "
                            f"(real-valued targets: --loss mse)")
        if len(y) and int(y.min()) < 0:
            raise DataError(f"{part} y must hold class labels >= 0, found {int(y.min())}")
        return y.long().contiguous()

    def check_outputs(self, outputs: Any, target: Any) -> None:
        if not isinstance(outputs, torch.Tensor) or outputs.dim() != 2 or outputs.shape[1] < 2:
            shape = tuple(outputs.shape) if isinstance(outputs, torch.Tensor) else type(outputs).__name__
            raise DataError(f"the model must map a batch of examples to [batch, n_classes] scores, "
                            f"got {shape}")
        c = int(outputs.shape[1])
        lo, hi = int(target.min()), int(target.max())
        if lo < 0 or hi >= c:
            raise DataError(f"labels must lie in [0, {c - 1}] for a model with {c} outputs, found "
                            f"[{lo}, {hi}]")


class Regression(Objective):
    """Real-valued targets `[B]` or `[B, ...]`: mean squared error, metric mse (lower is
    better). Outputs have the targets' shape (`[B, 1]` for 1-d targets is accepted)."""

    name, metric_name, higher_is_better = "mse", "mse", False

    @staticmethod
    def _match(outputs: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if outputs.shape != target.shape and outputs.numel() == target.numel():
            return outputs.reshape(target.shape)
        return outputs

    def loss(self, outputs: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.mse_loss(self._match(outputs, target), target.to(outputs.dtype))

    def per_example(self, outputs: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        d = self._match(outputs, target) - target.to(outputs.dtype)
        return d.pow(2).reshape(len(d), -1).mean(1)

    def check_targets(self, y: torch.Tensor, part: str) -> torch.Tensor:
        if y.dtype == torch.bool or y.dtype.is_complex:
            raise DataError(f"{part} y must hold real-valued targets for loss mse, got {y.dtype}")
        y = y.float()
        if not torch.isfinite(y).all():
            raise DataError(f"{part} y contains NaN or infinite values")
        return y.contiguous()

    def check_outputs(self, outputs: Any, target: Any) -> None:
        if isinstance(outputs, torch.Tensor) and outputs.numel() != target.numel():
            raise DataError(f"loss mse needs outputs of the targets' shape {tuple(target.shape)}, "
                            f"got {tuple(outputs.shape)}")
        super().check_outputs(outputs, target)


class NextToken(Objective):
    """A causal language model: outputs `[B, T, V]` logits, targets `[B, T]` the next token ids
    (-100 = ignored, as in Hugging Face); loss the mean token cross-entropy, metric perplexity
    (exp of the mean token NLL over the evaluated tokens)."""

    name, metric_name, higher_is_better = "next_token", "ppl", False
    ignore_index = -100

    def loss(self, outputs: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(outputs.reshape(-1, outputs.shape[-1]), target.reshape(-1),
                               ignore_index=self.ignore_index)

    def per_example(self, outputs: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        tok = F.cross_entropy(outputs.reshape(-1, outputs.shape[-1]), target.reshape(-1),
                              ignore_index=self.ignore_index, reduction="none").view(target.shape)
        valid = (target != self.ignore_index).float()
        return (tok * valid).reshape(len(tok), -1).sum(1) / valid.reshape(len(tok), -1).sum(1).clamp_min(1)

    def metric_terms(self, outputs: torch.Tensor, target: torch.Tensor
                     ) -> tuple[torch.Tensor, torch.Tensor]:
        flat = target.reshape(-1)
        tok = F.cross_entropy(outputs.reshape(-1, outputs.shape[-1]).float(), flat,
                              ignore_index=self.ignore_index, reduction="sum")
        return tok.detach(), (flat != self.ignore_index).sum().float()

    def finish(self, mean: torch.Tensor) -> torch.Tensor:
        return torch.exp(mean.clamp(max=80.0))

    def check_targets(self, y: torch.Tensor, part: str) -> torch.Tensor:
        if y.dim() < 2 or y.dtype.is_floating_point or y.dtype == torch.bool:
            raise DataError(f"{part} y must be integer token ids [N, T] for loss next_token, got "
                            f"{y.dtype} of shape {tuple(y.shape)}")
        return y.long().contiguous()

    def check_outputs(self, outputs: Any, target: Any) -> None:
        if not isinstance(outputs, torch.Tensor) or outputs.dim() != target.dim() + 1:
            shape = tuple(outputs.shape) if isinstance(outputs, torch.Tensor) else type(outputs).__name__
            raise DataError(f"loss next_token needs [batch, T, vocab] logits for targets "
                            f"{tuple(target.shape)}, got {shape}")
        hi = int(target.max())
        if hi >= outputs.shape[-1]:
            raise DataError(f"token id {hi} is outside the model's vocabulary of {outputs.shape[-1]}")
        super().check_outputs(outputs, target)


class FunctionObjective(Objective):
    """A plain `loss(outputs, target)` callable as an Objective: metric = its mean (lower is
    better), no per-example losses. The store key covers the function's name and source."""

    def __init__(self, fn: Callable[[torch.Tensor, Any], torch.Tensor], name: str | None = None) -> None:
        self.fn = fn
        self.name = name or getattr(fn, "__qualname__", type(fn).__name__)
        self.metric_name, self.higher_is_better = "loss", False

    def loss(self, outputs: torch.Tensor, target: Any) -> torch.Tensor:
        return self.fn(outputs, target)

    def identity(self) -> str:
        return f"{self.name}@{source_hash(self.fn)}"


_BUILTIN: dict[str, type[Objective]] = {"cross_entropy": Classification, "mse": Regression,
                                        "next_token": NextToken}
_SPEC_CACHE: dict[str, Objective] = {}


def objective_for(loss: str | Objective | Callable[..., Any] | None) -> Objective:
    """The Objective a config's `loss` (or a Python object) names. One-line ConfigErrors for
    an unknown name or a factory that does not return one."""
    if loss is None:
        return Classification()
    if isinstance(loss, Objective):
        return loss
    if callable(loss) and not isinstance(loss, str):
        return FunctionObjective(loss)
    if loss in _BUILTIN:
        return _BUILTIN[loss]()
    if loss.startswith(OBJECT_PREFIX):
        raise ConfigError(f"loss {loss!r} is a Python object: pass it as train(loss=...)")
    from batchlab.usercode import call_user, is_spec, load_object

    if not is_spec(loss):
        raise ConfigError(f"unknown loss {loss!r}; use {', '.join(BUILTIN_LOSSES)} or "
                          f"module:factory")
    if loss not in _SPEC_CACHE:
        obj = call_user(load_object(loss, "loss"), loss, "loss")
        if isinstance(obj, Objective):
            _SPEC_CACHE[loss] = obj
        elif callable(obj):
            _SPEC_CACHE[loss] = FunctionObjective(obj, name=loss)
        else:
            raise BatchlabError(f"{loss} returned {type(obj).__name__}, not an Objective or a "
                                f"loss(outputs, target) function (--loss)")
    return _SPEC_CACHE[loss]


def loss_field(loss: str | Objective | Callable[..., Any] | None) -> str:
    """The `TrainConfig.loss` string for a loss given to the Python API."""
    if loss is None:
        return "cross_entropy"
    if isinstance(loss, str):
        return loss
    obj = objective_for(loss)
    if type(obj) in _BUILTIN.values():
        return obj.name
    if type(obj).identity is Objective.identity:  # a subclass: its name and its code
        return f"{OBJECT_PREFIX}{type(obj).__qualname__}@{source_hash(type(obj))}"
    return OBJECT_PREFIX + obj.identity()


def require_accuracy(objective: Objective, what: str) -> None:
    """For experiments whose claims are about classification accuracy: a one-line error on
    any other objective, naming the metric the experiment uses."""
    if not objective.accuracy:
        raise ConfigError(f"{what} measures test accuracy (loss cross_entropy); loss "
                          f"{objective.name} has metric {objective.metric_name}: run it with "
                          f"loss cross_entropy")


def resolve_target(cfg: Any, objective: Objective | None = None) -> tuple[str, bool] | None:
    """(row key, lower is better) of the config's target, or None without one: `*_metric`
    is the objective's own metric (test_ppl for next_token), `*_acc` needs classification."""
    if cfg.target_metric is None:
        return None
    obj = objective if objective is not None else objective_for(cfg.loss)
    part, _, what = cfg.target_metric.partition("_")
    if what == "metric":
        return f"{part}_{obj.metric_name}", not obj.higher_is_better
    if what == "acc" and not obj.accuracy:
        raise ConfigError(f"target_metric {cfg.target_metric} needs classification; loss "
                          f"{obj.name} measures {obj.metric_name}: use {part}_metric or {part}_loss")
    return cfg.target_metric, what == "loss"


def source_hash(obj: Any) -> str:
    """12 hex digits of the source of a function or class (its qualified name if none)."""
    try:
        src = inspect.getsource(obj)
    except (OSError, TypeError):
        src = getattr(obj, "__qualname__", repr(type(obj)))
    return hashlib.sha256(src.encode()).hexdigest()[:12]


@dataclass
class Data:
    """A data source for `batchlab.train` / `batchlab.recommend` and `--data module:loader`.

    `train` / `test`: tensors `(X, y)`, a map-style `Dataset` (`ds[i] -> (x, y)`), an
    `IterableDataset` yielding `(x, y)` examples (streamed; `set_epoch(e)` is called when it
    has one) or a factory `(batch_size, seed) -> iterable of (x, y) batches`. Without `test`,
    tensors and map-style sets hold out a seeded 10% (at most 5,000); streams need one.
    `identity`: a declared name and version of the data (e.g. "wikitext-v2"): it enters the
    store key, with the length and a bounded prefix of examples (see `batchlab.data.stream`).
    `n_classes`: for the built-in models on a classification stream (else read off the
    prefix's labels)."""

    train: Any
    test: Any = None
    identity: str | None = None
    n_classes: int | None = None


def _batch_len(target: Any, outputs: torch.Tensor) -> int:
    return len(target) if hasattr(target, "__len__") else int(outputs.shape[0])


def _first_line(e: BaseException) -> str:
    s = str(e)
    return s.splitlines()[0] if s else ""


__all__ = ["BUILTIN_LOSSES", "resolve_target", "Classification", "Data", "FunctionObjective", "NextToken",
           "Objective", "Regression", "loss_field", "objective_for", "require_accuracy"]
