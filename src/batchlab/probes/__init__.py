"""Probes: measurements that plug into the training loop without touching it.

A probe is called at the start, optionally every `every_steps` optimizer steps (with the batch),
and at the end of every epoch, when it returns a flat dict of numbers that is stored with that
epoch's metrics.

When a probe sees the weights - the same in every engine (autograd, fused, vectorized K > 1):
- `on_start(ctx)`: the initial weights, before any step (its values are epoch 0's).
- `on_step(ctx, s, xb, yb)`: AFTER step s's update, i.e. the model holds the weights after s
  optimizer steps (s counts from 1 over the whole run); `xb`, `yb` are the batch step s used.
  A probe with `needs_grad = True` also finds on each parameter's `.grad` that batch's
  gradient at the PRE-update weights (the gradient step s's update used); it makes the engine
  use its autograd stepper (the fused steppers compute no `.grad`).
- `on_epoch_end(ctx, epoch)`: the weights after the epoch's last step.
The model is in train mode during `on_step`; use `measure.metrics.evaluate` (eval mode) for
clean evaluations.
"""

from __future__ import annotations

from batchlab.probes.base import PROBES, Probe, ProbeContext, register

__all__ = ["PROBES", "Probe", "ProbeContext", "make_probes", "register"]


def make_probes(names: list[str]) -> list[Probe]:
    from batchlab.errors import ConfigError

    _load_builtin()
    out = []
    for n in names:
        if n not in PROBES:
            raise ConfigError(f"unknown probe {n!r}; available: {', '.join(sorted(PROBES))}")
        out.append(PROBES[n]())
    return out


def _load_builtin() -> None:
    import importlib
    import pkgutil

    import batchlab.probes as pkg

    for mod in pkgutil.iter_modules(pkg.__path__):
        importlib.import_module(f"batchlab.probes.{mod.name}")
