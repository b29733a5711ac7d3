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
from batchlab.data import RawData, TensorData, load_dataset, prepare_for
from batchlab.data.stream import StreamData
from batchlab.data.tensors import load_user
from batchlab.errors import ConfigError
from batchlab.nn import factory
from batchlab.task import OBJECT_PREFIX, objective_for


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
    if dev.type == "mps" and not (getattr(torch.backends, "mps", None) is not None
                                  and torch.backends.mps.is_available()):
        raise ConfigError(f"device {spec} requested but MPS (Apple GPU) is not available here; "
                          f"use auto, cpu or cuda[:N]")
    if dev.type not in ("cpu", "cuda", "mps"):
        raise ConfigError(f"device {spec!r} is not supported; use auto, cpu, mps or cuda[:N]")
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


def get_data(cfg: TrainConfig, device: torch.device, objective: Any = None) -> TensorData | StreamData:
    """The data of this config: resident tensors (memoized: a sweep prepares each variant
    once) of the named dataset or of the user's loader (`cfg.data`), flattened for the built-in
    MLP; or, when the loader returns a Dataset, IterableDataset or factory, the `StreamData`
    that batches it (never loaded whole). Targets are checked for the config's loss
    (`objective`, when it is a Python object)."""
    if cfg.data:
        obj = objective if objective is not None else objective_for(
            None if cfg.loss.startswith(OBJECT_PREFIX) else cfg.loss)
        raw = load_user(cfg.data, flat=cfg.model == "mlp", objective=obj, builtin=cfg.builtin_model,
                        max_train=cfg.max_train, max_test=cfg.max_test)
        if isinstance(raw, StreamData):
            if cfg.val_fraction > 0:
                raise ConfigError("val_fraction needs tensor data; a streamed source brings its "
                                  "own test part")
            return raw
    else:
        if cfg.loss != "cross_entropy":
            raise ConfigError(f"loss {cfg.loss} needs your data (--data module:loader): the "
                              f"built-in datasets are classification")
        raw = load_dataset(cfg.dataset, cfg.data_dir)
    return prepare_for(raw, cfg, device)  # memoized: a sweep prepares each variant once


def build_model(cfg: TrainConfig, data: TensorData | StreamData, objective: Any = None) -> nn.Module:
    """The config's network for this data's shapes (seeded by `cfg.seed`; `nn.factory`)."""
    return factory.build_model(cfg, data, objective)


def shuffle_generator(seed: int) -> torch.Generator:
    """The run's shuffle stream: distinct from the init generator, which uses `seed` itself."""
    return torch.Generator().manual_seed(seed * 1_000_003 + 7919)


def check_batch_sizes(cfg: TrainConfig, data: TensorData | StreamData) -> None:
    for bs in cfg.batch_sizes():
        if data.n_train is not None and bs > data.n_train:
            raise ConfigError(f"batch size {bs} is larger than the training set ({data.n_train})")


def run_key(cfg: TrainConfig, data: TensorData | StreamData | RawData,
            model: nn.Module | None = None) -> str:
    """The store key of a run: the config with the data's fingerprint; the initial weights
    enter too when they are not a function of the config (a user's factory, or a module
    passed by the caller: `model`, freshly built). See `nn.factory.run_fingerprint`. Every
    place that looks a run up (train, train_many, the Ray driver and its tasks) asks this one
    function, so a key can never differ between where a run is stored and where it is sought.
    `RawData` (only its fingerprint is read) serves the built-in models, which is all the Ray
    executor trains."""
    if model is None and not cfg.builtin_model:
        torch.manual_seed(cfg.seed)  # as the loop builds it: a factory may use the global RNG
        model = build_model(cfg, data)
    return cfg.key(factory.run_fingerprint(cfg, data, model))
