"""What a run needs before its first step: the device, the resident data, the model, the
shuffle stream and the run's key. Shared by the loop, the runs layer, experiments and
benchmarks, so every caller builds a run exactly the same way.

A run is a function of its config and seed: the init uses `seed` itself, the shuffles a
dedicated stream derived from it (`shuffle_generator`), so changing one never moves the other.
"""

from __future__ import annotations

import platform
from typing import Any

import numpy as np
import torch
from torch import nn

from batchlab.config import TrainConfig
from batchlab.data import TensorData, load_dataset, prepare
from batchlab.data.tensors import load_user
from batchlab.errors import ConfigError
from batchlab.nn import factory


def resolve_device(spec: str = "auto") -> torch.device:
    """`auto` -> cuda when available, else cpu; an unusable spec is a one-line ConfigError."""
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(spec)
    except RuntimeError:
        raise ConfigError(f"unknown device {spec!r}; use auto, cpu or cuda[:N]") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {spec} requested but CUDA is not available")
    return dev


def environment(device: torch.device) -> dict[str, Any]:
    """Versions and hardware a run was computed with (stored beside its metrics)."""
    import batchlab

    env = {
        "batchlab": batchlab.__version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "platform": platform.platform(),
        "device": str(device),
        "threads": torch.get_num_threads(),
    }
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
    return env


_TD_CACHE: dict[tuple, TensorData] = {}


def get_data(cfg: TrainConfig, device: torch.device) -> TensorData:
    """Resident tensors for this config (memoized: a sweep prepares each variant once): the
    named dataset, or the user's loader (`cfg.data`), flattened for the built-in MLP."""
    raw = load_user(cfg.data, flat=cfg.model == "mlp") if cfg.data else load_dataset(cfg.dataset, cfg.data_dir)
    k = (raw.fingerprint, raw.x_train.shape[1:], cfg.normalize, cfg.val_fraction, cfg.max_train,
         cfg.max_test, str(device))
    if k not in _TD_CACHE:
        if len(_TD_CACHE) > 4:
            _TD_CACHE.clear()
        _TD_CACHE[k] = prepare(raw, normalize=cfg.normalize, val_fraction=cfg.val_fraction,
                               max_train=cfg.max_train, max_test=cfg.max_test, device=device)
    return _TD_CACHE[k]


def build_model(cfg: TrainConfig, data: TensorData) -> nn.Module:
    """The config's network for this data's shapes (seeded by `cfg.seed`; `nn.factory`)."""
    return factory.build_model(cfg, data)


def shuffle_generator(seed: int) -> torch.Generator:
    """The run's shuffle stream: distinct from the init generator, which uses `seed` itself."""
    return torch.Generator().manual_seed(seed * 1_000_003 + 7919)


def check_batch_sizes(cfg: TrainConfig, data: TensorData) -> None:
    for bs in cfg.batch_sizes():
        if bs > data.n_train:
            raise ConfigError(f"batch size {bs} is larger than the training set ({data.n_train})")


def run_key(cfg: TrainConfig, data: TensorData, model: nn.Module | None = None) -> str:
    """The store key of a run: the config with the data's fingerprint; the initial weights
    enter too when they are not a function of the config (a user's factory, or a module
    passed by the caller: `model`, freshly built). See `nn.factory.run_fingerprint`."""
    if model is None and not cfg.builtin_model:
        torch.manual_seed(cfg.seed)  # as the loop builds it: a factory may use the global RNG
        model = build_model(cfg, data)
    return cfg.key(factory.run_fingerprint(cfg, data, model))
