"""`batchlab recommend`: which batch size (and lr) to use for this model, data and device.

The package, one job per module: `run` (the measurements and the report), `decide` (the
decision math: steps model, batch size for time and for compute, lr rule), `lr_search` (the
lr at a batch size, by the fewest steps to a loss), `sweep` (the optional steps-to-target
sweep), `figure`, `api` (the Python entry point). Loading the user's model and data lives in
`batchlab.usercode`.

The package is also callable: `batchlab.recommend(model, data, loss=..., optimizer=...)` is
`api.recommend` and returns a `Recommendation` (a package and a function cannot share the name
`batchlab.recommend` otherwise, and the package came first).
"""

from __future__ import annotations

import sys
import types
from typing import Any

from batchlab.recommend.api import Recommendation
from batchlab.recommend.api import recommend as recommend_task
from batchlab.recommend.decide import critical_batch, decide, lr_rule_from_sweep, scale_lr
from batchlab.recommend.run import recommend

__all__ = ["Recommendation", "critical_batch", "decide", "lr_rule_from_sweep", "recommend",
           "recommend_task", "scale_lr"]


class _CallablePackage(types.ModuleType):
    def __call__(self, *args: Any, **kwargs: Any) -> Recommendation:
        return recommend_task(*args, **kwargs)


sys.modules[__name__].__class__ = _CallablePackage
