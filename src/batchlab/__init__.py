"""batchlab: how batch size shapes neural-network training.

    from batchlab import TrainConfig, train
    result = train(TrainConfig(dataset="mnist-5k", batch_size=64, lr=0.01, epochs=3))
    result.final["test_acc"]

The public names below are imported lazily, so `import batchlab.data` does not pull in the
engine, the store or the CLI.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.2.0"

_PUBLIC = {
    "GradientNoiseScale": "batchlab.measure.gns",
    "MicroBatchNoiseScale": "batchlab.measure.noise_micro",
    "Phase": "batchlab.config",
    "TrainConfig": "batchlab.config",
    "Store": "batchlab.runs.store",
    "TrainResult": "batchlab.engine.result",
    "train": "batchlab.runs.training",
    "register_optimizer": "batchlab.nn.registry",
    "register_experiment": "batchlab.experiments",
}
_MODULES = {  # submodules reachable as `from batchlab import curvature`
    "curvature": "batchlab.measure.curvature",
    "noise": "batchlab.measure.noise",
    "gradcomp": "batchlab.analysis.gradcomp",
    "recommend": "batchlab.recommend",  # callable: batchlab.recommend(model, data, ...)
}

__all__ = ["__version__", *_PUBLIC, *_MODULES]


def __getattr__(name: str) -> Any:
    if name in _MODULES:
        value = importlib.import_module(_MODULES[name])
    elif name in _PUBLIC:
        value = getattr(importlib.import_module(_PUBLIC[name]), name)
    else:
        raise AttributeError(f"module 'batchlab' has no attribute {name!r}")
    globals()[name] = value
    return value
