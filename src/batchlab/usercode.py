"""User code: a model factory and a data loader named `module:function`, loaded and checked.

The contract (the same for `train`, `sweep`, `experiment`, `reproduce` and `recommend`):
- `--model module:factory`: `factory()` returns a `torch.nn.Module` mapping a batch of inputs to
  `[batch, n_classes]` logits or log-probabilities;
- `--data module:loader`: `loader()` returns `(X, y)` or `(X_train, y_train, X_test, y_test)`,
  tensors or arrays, `y` the targets the loss takes (integer class labels for the default
  classification), or a data source that is not tensors (`batchlab.task.Data`, a Dataset, an
  IterableDataset: streamed by `batchlab.data.stream`);
- `--loss`: `cross_entropy` (default), `mse`, `next_token` or `module:factory` (`batchlab.task`).
The module is imported from `sys.path` (PYTHONPATH) or the current directory. Every failure in
user code becomes one line naming the spec, never a traceback: it is the user's to fix.
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

BUILTIN_MODELS = ("mlp", "cnn")
MIN_EXAMPLES = 64


def is_spec(value: str) -> bool:
    """`module:attribute` with both parts non-empty."""
    mod, sep, attr = value.partition(":")
    return bool(sep and mod.strip() and attr.strip())


def _first_line(e: BaseException) -> str:
    s = str(e)
    return s.splitlines()[0] if s else ""


def load_object(spec: str, what: str) -> Any:
    """Import `module:attribute` (the module from sys.path / PYTHONPATH or the current dir)."""
    if not is_spec(spec):
        raise BatchlabError(f"--{what} expects module:function, got {spec!r}")
    mod_name, attr = spec.split(":", 1)
    if "" not in sys.path and str(Path.cwd()) not in sys.path:
        sys.path.insert(0, str(Path.cwd()))
    try:
        mod = importlib.import_module(mod_name)
    except SystemExit as e:
        raise BatchlabError(f"importing {mod_name!r} for --{what} called sys.exit({e.code!r}); "
                            f"a module must not exit when imported") from None
    except Exception as e:  # any failure while importing user code is the user's to fix
        raise BatchlabError(f"cannot import {mod_name!r} for --{what}: {type(e).__name__}: "
                            f"{_first_line(e)}") from None
    if not hasattr(mod, attr):
        raise BatchlabError(f"module {mod_name!r} has no attribute {attr!r} (--{what})")
    obj = getattr(mod, attr)
    if not callable(obj):
        raise BatchlabError(f"{spec} is not callable (--{what})")
    return obj


def call_user(fn: Any, spec: str, what: str) -> Any:
    """Call a user function with no arguments; its exceptions become one-line errors."""
    try:
        return fn()
    except SystemExit as e:  # exit 0 with nothing stored would pass for success
        raise BatchlabError(f"{spec} called sys.exit({e.code!r}) (--{what}); a factory must "
                            f"return its result, not exit") from None
    except Exception as e:
        raise BatchlabError(f"{spec} raised {type(e).__name__}: {_first_line(e)} (--{what})") from None


class UserCodeError(BatchlabError):
    """An exception raised inside the user's own code (model, data, loss) while batchlab ran
    it: the user's to fix, reported in one line naming where; `__cause__` keeps the
    traceback (the CLI writes it to a log file)."""


def _library_dirs() -> tuple[str, ...]:
    import sysconfig

    import batchlab

    dirs = {str(Path(batchlab.__file__).resolve().parent)}
    for key in ("stdlib", "platstdlib", "purelib", "platlib"):
        try:
            dirs.add(str(Path(sysconfig.get_paths()[key]).resolve()))
        except (KeyError, OSError):
            continue
    return tuple(dirs)


def user_error(exc: BaseException) -> UserCodeError | None:
    """`exc` as the user's error when its traceback passes through a file outside batchlab,
    the standard library and installed packages (the user's module); None otherwise (a
    batchlab error, or a bug)."""
    import traceback

    if isinstance(exc, BatchlabError) or exc.__traceback__ is None:
        return None
    libs = _library_dirs()
    frames = [f for f in traceback.extract_tb(exc.__traceback__)
              if not f.filename.startswith("<")
              and not str(Path(f.filename).resolve()).startswith(libs)]
    if not frames:
        return None
    f = frames[-1]
    err = UserCodeError(f"your code raised {type(exc).__name__}: {_first_line(exc)[:200]} "
                        f"(at {Path(f.filename).name}:{f.lineno} in {f.name}); the run is stored "
                        f"as failed")
    err.__cause__ = exc
    return err


def user_model(spec: str) -> nn.Module:
    """The module `spec` builds (its weights are drawn from torch's global RNG: seed it first)."""
    m = call_user(load_object(spec, "model"), spec, "model")
    if not isinstance(m, nn.Module):
        raise BatchlabError(f"{spec} returned {type(m).__name__}, not a torch.nn.Module (--model)")
    if not any(p.requires_grad for p in m.parameters()):
        raise BatchlabError(f"{spec} returned a module without trainable parameters (--model)")
    check_finite_weights(m, spec)
    return m


def check_finite_weights(model: nn.Module, what: str) -> None:
    """Refuse initial weights holding NaN or inf: such a run could only be stored as
    'diverged', a result it never had."""
    bad = [n for n, t in model.state_dict().items()
           if t.is_floating_point() and not bool(torch.isfinite(t).all())]
    if bad:
        raise BatchlabError(f"{what} built initial weights holding NaN or infinite values "
                            f"({', '.join(bad[:3])}); fix the model's initialization")


def _as_tensor(v: Any, spec: str) -> torch.Tensor:
    if isinstance(v, torch.Tensor):
        return v.detach().cpu()
    try:
        return torch.as_tensor(np.asarray(v))
    except Exception:
        raise DataError(f"{spec} must return tensors or arrays (--data)") from None


def _check_pair(x: torch.Tensor, y: torch.Tensor, part: str, objective: Any
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """X with a batch dimension (float32, or int64 when integer: token ids stay ids) and y
    checked by the objective (a `batchlab.task.Objective`: class labels for classification)."""
    obj = objective
    if x.dim() < 2 and obj.accuracy:
        raise DataError(f"{part} X must have a batch dimension and features, got shape {tuple(x.shape)}")
    if x.dim() < 1 or len(x) != len(y):
        raise DataError(f"{part} X has {len(x) if x.dim() else 0} rows but y has {len(y)} "
                        f"{'labels' if obj.accuracy else 'targets'}")
    y = obj.check_targets(y, part)
    if x.dtype == torch.bool or x.dtype.is_complex:
        raise DataError(f"{part} X must be numbers, got dtype {x.dtype}")
    if x.dtype.is_floating_point:
        x = x.float()
        if not torch.isfinite(x).all():
            raise DataError(f"{part} X contains NaN or infinite values")
    else:
        x = x.long()
    return x.contiguous(), y


def user_output(spec: str) -> Any:
    """What the loader returns, unchecked: tensors, or a data source (see `batchlab.task.Data`)."""
    return call_user(load_object(spec, "data"), spec, "data")


def user_data(spec: str, objective: Any, out: Any = None) -> tuple[torch.Tensor, ...]:
    """`(X, y)` or `(X_train, y_train, X_test, y_test)` from the loader (or `out`, what it
    returned), validated for the objective (a `batchlab.task.Objective`: shapes, targets,
    finiteness) with one-line errors: X float32 (int64 when integer), y as the objective wants
    it, on the CPU. The objective is passed in, never looked up here: `batchlab.task` loads
    user code through this module, so this one does not import it (no cycle)."""
    obj = objective
    if out is None:
        out = user_output(spec)
    if not isinstance(out, (tuple, list)) or len(out) not in (2, 4):
        raise DataError(f"{spec} must return a pair (X, y) or (X_train, y_train, X_test, y_test), got "
                        f"{type(out).__name__}{f' of {len(out)}' if isinstance(out, (tuple, list)) else ''}"
                        f" (--data)")
    ts = [_as_tensor(v, spec) for v in out]
    pairs = [_check_pair(ts[0], ts[1], "train" if len(ts) == 4 else "the", obj)]
    if len(ts) == 4:
        pairs.append(_check_pair(ts[2], ts[3], "test", obj))
        if pairs[0][0].shape[1:] != pairs[1][0].shape[1:]:
            raise DataError(f"train X has examples of shape {tuple(pairs[0][0].shape[1:])} but test X "
                            f"of shape {tuple(pairs[1][0].shape[1:])}")
        if len(pairs[1][1]) == 0:
            raise DataError("the test part is empty")
    if len(pairs[0][1]) < MIN_EXAMPLES:
        raise DataError(f"need at least {MIN_EXAMPLES} training examples, got {len(pairs[0][1])}")
    if obj.accuracy:
        labels = torch.cat([p[1] for p in pairs])
        if int(labels.max()) < 1:
            raise DataError("y must contain at least two classes")
    return tuple(t for p in pairs for t in p)


def fingerprint_tensors(*tensors: torch.Tensor) -> str:
    """sha256 over each tensor's dtype, shape and bytes: the content identity of user data."""
    h = hashlib.sha256()
    for t in tensors:
        a = t.detach().cpu().contiguous()
        h.update(f"{a.dtype}{tuple(a.shape)}".encode())
        h.update(a.numpy().tobytes())
    return h.hexdigest()


def check_model_on_data(model: nn.Module, x: torch.Tensor, y: torch.Tensor, objective: Any) -> int:
    """Run the model on two examples and score them with the objective (for classification
    `y` may be all labels, whose range is checked against the outputs). Returns the
    number of classes (0 for other objectives). Shape and target errors here are the user's,
    reported in one line."""
    obj = objective
    was = model.training
    try:
        with torch.no_grad():
            out = model.eval()(x[:2])
    except SystemExit as e:
        raise DataError(f"the model's forward called sys.exit({e.code!r})") from None
    except Exception as e:
        raise DataError(f"the model cannot take X of shape {tuple(x.shape[1:])} per example: "
                        f"{type(e).__name__}: {_first_line(e)}") from None
    finally:
        model.train(was)
    if isinstance(out, torch.Tensor) and not (out.is_floating_point() or out.is_complex()):
        raise DataError(f"the model must return floating-point scores, got dtype {out.dtype}")
    if obj.accuracy:
        if not isinstance(out, torch.Tensor) or out.dim() != 2 or out.shape[0] != len(x[:2]) or out.shape[1] < 2:
            shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise DataError(f"the model must map a batch of 2 examples to [2, n_classes] scores, "
                            f"got {shape}")
        obj.check_outputs(out, y)
        return int(out.shape[1])
    obj.check_outputs(out, y[: len(x[:2])])
    return 0
