"""`batchlab recommend`: which batch size (and lr) to use for this model, data and device.

The package, one job per module: `run` (the measurements and the report), `decide` (the
decision math: steps model, batch size for time and for compute, lr rule), `sweep` (the
optional steps-to-target sweep), `figure`. This module also holds the loading of the user's
model and data (`--model`/`--data`), which the CLI shares.
"""

from __future__ import annotations

import hashlib
import importlib
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from batchlab.errors import BatchlabError, DataError
from batchlab.recommend.decide import critical_batch, decide, lr_rule_from_sweep, scale_lr
from batchlab.recommend.run import recommend

__all__ = ["critical_batch", "decide", "load_object", "lr_rule_from_sweep", "recommend",
           "scale_lr", "tensor_data", "user_data", "user_model"]


# -- user code --------------------------------------------------------------------------------
def load_object(spec: str, what: str) -> Any:
    """Import `module:attribute` (the module from sys.path / PYTHONPATH or the current dir)."""
    if ":" not in spec:
        raise BatchlabError(f"--{what} expects module:function, got {spec!r}")
    mod_name, attr = spec.split(":", 1)
    if "" not in sys.path and str(Path.cwd()) not in sys.path:
        sys.path.insert(0, str(Path.cwd()))
    try:
        mod = importlib.import_module(mod_name)
    except Exception as e:  # any failure while importing user code is the user's to fix
        raise BatchlabError(f"cannot import {mod_name!r} for --{what}: {type(e).__name__}: "
                            f"{str(e).splitlines()[0] if str(e) else ''}") from None
    if not hasattr(mod, attr):
        raise BatchlabError(f"module {mod_name!r} has no attribute {attr!r} (--{what})")
    obj = getattr(mod, attr)
    if not callable(obj):
        raise BatchlabError(f"{spec} is not callable (--{what})")
    return obj


def _call(fn: Any, spec: str, what: str) -> Any:
    try:
        return fn()
    except Exception as e:
        raise BatchlabError(f"{spec} raised {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
                            f" (--{what})") from None


def user_model(spec: str) -> nn.Module:
    m = _call(load_object(spec, "model"), spec, "model")
    if not isinstance(m, nn.Module):
        raise BatchlabError(f"{spec} returned {type(m).__name__}, not a torch.nn.Module (--model)")
    if not any(p.requires_grad for p in m.parameters()):
        raise BatchlabError(f"{spec} returned a module without trainable parameters (--model)")
    return m


def user_data(spec: str) -> tuple[torch.Tensor, torch.Tensor]:
    out = _call(load_object(spec, "data"), spec, "data")
    if not isinstance(out, (tuple, list)) or len(out) != 2:
        raise DataError(f"{spec} must return a pair (X, y), got {type(out).__name__} (--data)")
    try:
        x, y = (torch.as_tensor(np.asarray(v)) if not isinstance(v, torch.Tensor) else v for v in out)
    except Exception:
        raise DataError(f"{spec} must return tensors or arrays (X, y) (--data)") from None
    if x.dim() < 2:
        raise DataError(f"X must have a batch dimension and features, got shape {tuple(x.shape)}")
    if y.dim() != 1:
        raise DataError(f"y must be 1-d class labels, got shape {tuple(y.shape)}")
    if len(x) != len(y):
        raise DataError(f"X has {len(x)} rows but y has {len(y)} labels")
    if len(y) < 64:
        raise DataError(f"need at least 64 examples, got {len(y)}")
    if y.dtype == torch.bool or (y.dtype.is_floating_point and not torch.equal(y, y.round())):
        raise DataError(f"y must hold integer class labels, got dtype {y.dtype}")
    if not x.dtype.is_floating_point:
        x = x.float()
    if not torch.isfinite(x).all():
        raise DataError("X contains NaN or infinite values")
    return x.float().contiguous(), y.long().contiguous()


def _check_model_on_data(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> int:
    """Run the model on two examples; returns the number of classes. Shape and label errors
    here are the user's, reported in one line."""
    try:
        with torch.no_grad():
            out = model.eval()(x[:2])
    except Exception as e:
        raise DataError(f"the model cannot take X of shape {tuple(x.shape[1:])} per example: "
                        f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None
    finally:
        model.train()
    if not isinstance(out, torch.Tensor) or out.dim() != 2 or out.shape[0] != 2 or out.shape[1] < 2:
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise DataError(f"the model must map a batch of 2 examples to [2, n_classes] scores, "
                        f"got {shape}")
    c = int(out.shape[1])
    lo, hi = int(y.min()), int(y.max())
    if lo < 0 or hi >= c:
        raise DataError(f"labels must lie in [0, {c - 1}] for a model with {c} outputs, found "
                        f"[{lo}, {hi}]")
    return c


def tensor_data(x: torch.Tensor, y: torch.Tensor, n_classes: int, device: torch.device,
                seed: int = 0):
    """Resident TensorData: a seeded 10% (at most 5000) held out as the test set."""
    from batchlab.data import TensorData

    n = len(y)
    n_test = min(5000, max(1, n // 10))
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    te, tr = perm[:n_test].sort().values, perm[n_test:].sort().values
    h = hashlib.sha256(x.cpu().numpy().tobytes())
    h.update(y.cpu().numpy().tobytes())
    xtr, ytr = x[tr].to(device), y[tr].to(device)
    return TensorData(x_train=xtr, y_train=ytr,
                      eval_sets={"train": (xtr, ytr), "test": (x[te].to(device), y[te].to(device))},
                      input_dim=int(x[0].numel()), n_classes=n_classes, fingerprint=h.hexdigest())
