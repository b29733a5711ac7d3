"""Large-batch schedule recipes from the literature, as plain TrainConfig fields.

Called "recipes", not "presets": a preset is the quick/paper budget of `--preset`; the user
command that prints a recipe keeps its name, `batchlab schedule-preset NAME` (`cli.recipes`).

`apply_recipe(name, base, batch_size=..., base_batch=...)` turns a small-batch config (`base`,
a dict of TrainConfig fields) into the large-batch config a paper prescribes. The result is a
dict of fields, so it runs anywhere a config does: `train(make_config(**fields))`, the
`[base]` table of a sweep TOML (`recipe_toml` writes the fields), or `batchlab train --config`.

* "goyal" - Goyal et al. 2017, "Accurate, Large Minibatch SGD": lr scaled linearly with the
  batch size (lr x B/B0) and a gradual linear warmup from ~0 over the first epochs.
* "smith" - Smith et al. 2018, "Don't Decay the Learning Rate, Increase the Batch Size": the
  base config's step decays of the lr by a factor f are replaced, one for one, by multiplying
  the batch size by 1/f (a `schedule` of phases at constant lr); once the batch would exceed
  `max_batch` (the training set), the remaining factor is applied to the lr instead, as the
  paper does when it runs out of batch size.
* "hoffer" - Hoffer et al. 2017, "Train Longer, Generalize Better": regime adaptation (epochs,
  and the epochs of lr decays, multiplied by B/B0, so the number of steps equals the
  small-batch run's), lr scaled by sqrt(B/B0), and Ghost Batch Normalization with ghost batches
  of B0 when the model has BatchNorm (`batchnorm=True`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from batchlab.errors import ConfigError

Fields = dict[str, Any]


def _base_lr(base: Fields) -> float:
    return float(base.get("lr", 0.01))


def _check(batch_size: int, base_batch: int) -> None:
    if batch_size <= 0 or base_batch <= 0:
        raise ConfigError("recipe batch sizes must be positive")


def goyal(base: Fields, *, batch_size: int, base_batch: int | None = None,
          warmup_epochs: float = 5.0, **_: Any) -> Fields:
    """Linear scaling rule + gradual warmup (Goyal et al.)."""
    b0 = int(base_batch or base.get("batch_size", 64))
    _check(batch_size, b0)
    epochs = int(base.get("epochs", 30))
    return {**base, "batch_size": batch_size, "lr": _base_lr(base) * batch_size / b0,
            "warmup_epochs": min(float(warmup_epochs), max(epochs - 1, 0) / 2)}


def smith(base: Fields, *, max_batch: int | None = None, **_: Any) -> Fields:
    """Each step decay of the lr becomes a batch-size increase by the same factor (Smith et
    al.). `base` must use decay="step" with decay_epochs (the schedule being converted)."""
    if base.get("decay") != "step" or not base.get("decay_epochs"):
        raise ConfigError("the smith recipe converts a step decay: the base config needs "
                          "decay='step' and decay_epochs")
    b0 = int(base.get("batch_size", 64))
    lr = _base_lr(base)
    factor = float(base.get("decay_factor", 0.1))
    epochs = int(base.get("epochs", 30))
    bounds = sorted(int(e) for e in base["decay_epochs"] if 0 < int(e) < epochs)
    edges = [0, *bounds, epochs]
    phases = []
    bs, phase_lr = float(b0), lr
    for i in range(len(edges) - 1):
        if i > 0:  # the i-th decay: grow the batch by 1/factor, spill the rest into the lr
            want = bs / factor
            new_bs = min(want, float(max_batch)) if max_batch else want
            phase_lr *= new_bs / want
            bs = new_bs
        phases.append({"epochs": edges[i + 1] - edges[i], "batch_size": int(round(bs)),
                       "lr": phase_lr})
    out = {k: v for k, v in base.items() if k not in ("decay", "decay_epochs", "decay_factor")}
    return {**out, "batch_size": b0, "lr": lr, "decay": "none", "schedule": phases}


def hoffer(base: Fields, *, batch_size: int, base_batch: int | None = None, **_: Any) -> Fields:
    """Regime adaptation + sqrt lr scaling + Ghost Batch Norm (Hoffer et al.)."""
    b0 = int(base_batch or base.get("batch_size", 64))
    _check(batch_size, b0)
    r = batch_size / b0
    out = {**base, "batch_size": batch_size, "lr": _base_lr(base) * math.sqrt(r),
           "epochs": max(1, int(math.ceil(int(base.get("epochs", 30)) * r)))}
    if base.get("decay_epochs"):
        out["decay_epochs"] = [int(round(e * r)) for e in base["decay_epochs"]]
    if base.get("warmup_epochs"):
        out["warmup_epochs"] = float(base["warmup_epochs"]) * r
    if base.get("batchnorm"):
        out["ghost_batch_size"] = b0
    return out


RECIPES: dict[str, Callable[..., Fields]] = {"goyal": goyal, "smith": smith, "hoffer": hoffer}
ALIASES = {"linear-warmup": "goyal", "increase-batch": "smith", "regime-adaptation": "hoffer"}


def apply_recipe(name: str, base: Fields, **kw: Any) -> Fields:
    """TrainConfig fields for recipe `name` applied to the small-batch config `base`
    (keyword arguments: batch_size, base_batch, warmup_epochs, max_batch - as the recipe needs).
    The result is validated as a TrainConfig before it is returned."""
    from batchlab.config import make_config

    key = ALIASES.get(name, name)
    if key not in RECIPES:
        names = ", ".join(sorted([*RECIPES, *ALIASES]))
        raise ConfigError(f"unknown schedule recipe {name!r}; choose one of {names}")
    fields = RECIPES[key](dict(base), **kw)
    make_config(**fields)  # fail early, one line, on an impossible result
    return fields


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f'"{k}" = {_toml_value(x)}' for k, x in v.items()) + "}"
    raise TypeError(f"cannot write {type(v).__name__} to TOML")


def recipe_toml(fields: Fields, table: str | None = None) -> str:
    """The fields as TOML (top level for `train --config`, or under `[table]`, e.g. `base` for
    a sweep file). None values are left out (TOML has no null)."""
    lines = [f"[{table}]"] if table else []
    lines += [f"{k} = {_toml_value(v)}" for k, v in fields.items() if v is not None]
    return "\n".join(lines) + "\n"
