"""The network a config names: `model = "mlp"` (the study's MLP), `"cnn"` (a LeNet-sized CNN)
or `"module:factory"` (a user's `nn.Module`).

A user factory's weights come from torch's global RNG, which is seeded with the run's seed just
before the call, so a run stays a function of its config and seed. Under classification its output may be logits or
log-probabilities: the module is wrapped in a LogSoftmax (which leaves log-probabilities as
they are), so the NLL the engine minimizes is the cross-entropy either way; other objectives
(`batchlab.task`) take the outputs as they are. Because the
factory's code is not in the config, the store key of a user-model run also covers its initial
weights (`keyed_fingerprint`): edit the factory and the key changes.
"""

from __future__ import annotations

import hashlib
import math
from typing import Any

import torch
from torch import nn

from batchlab.errors import ConfigError
from batchlab.nn.models import build_cnn, build_mlp
from batchlab.usercode import BUILTIN_MODELS, check_model_on_data, user_model


def image_shape(data: Any) -> tuple[int, ...]:
    """One example's image shape: the dataset's own, or a square single-channel image when
    only a flat length is known."""
    shape = tuple(getattr(data, "input_shape", None) or ())
    if len(shape) >= 2:
        return shape
    d = int(shape[0]) if shape else int(data.input_dim)
    s = math.isqrt(d)
    if s * s != d:
        raise ConfigError(f"model 'cnn' needs image-shaped inputs; examples of {d} features are "
                          f"not a square image (give the loader's X as [N, C, H, W])")
    return (1, s, s)


def build_model(cfg: Any, data: Any, objective: Any = None) -> nn.Module:
    """A freshly initialized model for `cfg` on `data` (a TensorData or StreamData:
    input_dim, n_classes, input_shape, and the examples a user model is checked on). A user
    model is checked against the objective (the config's `loss` unless given) and gets a
    LogSoftmax when the objective reads log-probabilities (classification)."""
    if cfg.model in BUILTIN_MODELS and getattr(cfg, "loss", "cross_entropy") != "cross_entropy":
        raise ConfigError(f"the built-in {cfg.model} is a classifier; loss {cfg.loss} needs your "
                          f"model (--model module:factory)")
    if cfg.model == "mlp":
        return build_mlp(data.input_dim, cfg.hidden, data.n_classes, init=cfg.init, seed=cfg.seed,
                         batchnorm=cfg.batchnorm, ghost_batch_size=cfg.ghost_batch_size)
    if cfg.model == "cnn":
        return build_cnn(image_shape(data), data.n_classes, init=cfg.init, seed=cfg.seed)
    if cfg.model in BUILTIN_MODELS:  # pragma: no cover - a built-in without a builder
        raise ConfigError(f"no builder for model {cfg.model!r}")
    from batchlab.task import objective_for

    obj = objective if objective is not None else objective_for(cfg.loss)
    torch.manual_seed(cfg.seed)
    net = user_model(cfg.model)
    x2, targets = model_check_data(data, obj.accuracy)
    check_model_on_data(net, x2, targets, obj)
    return as_log_probs(net) if obj.log_probs else net


def model_check_data(data: Any, all_labels: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Two inputs to run a new model on, and the targets to check its outputs against (every
    label of resident data when `all_labels`, for the range check; else the two examples')."""
    if getattr(data, "streamed", False):
        x, y = data.prefix()
        return x[:2], (y if all_labels else y[:2])
    if all_labels:
        return data.x_train[:2].cpu(), torch.cat([y.reshape(-1).cpu() for _, y in data.eval_sets.values()])
    return data.x_train[:2].cpu(), data.y_train[:2].cpu()


def as_log_probs(net: nn.Module) -> nn.Module:
    """`net` followed by LogSoftmax: logits become log-probabilities, log-probabilities stay."""
    return nn.Sequential(net, nn.LogSoftmax(dim=-1))


def keyed_fingerprint(data_fingerprint: str, model: nn.Module) -> str:
    """The data fingerprint extended by the model's initial weights (names and bytes)."""
    h = hashlib.sha256(data_fingerprint.encode())
    for k, v in model.state_dict().items():
        h.update(k.encode() + v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def run_fingerprint(cfg: Any, data: Any, model: nn.Module | None = None) -> str:
    """What `cfg.key` is taken over besides the config: the data's content fingerprint, plus
    the initial weights when they are not a function of the config (a user's factory, or a
    module passed to `train`). `model`: that freshly built module, if the caller has it."""
    if model is None and cfg.model in BUILTIN_MODELS:
        return data.fingerprint
    if model is None:
        model = build_model(cfg, data)
    return keyed_fingerprint(data.fingerprint, model)
