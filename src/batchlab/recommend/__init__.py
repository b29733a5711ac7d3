"""`batchlab recommend`: which batch size (and lr) to use for this model, data and device.

The package, one job per module: `run` (the measurements and the report), `decide` (the
decision math: steps model, batch size for time and for compute, lr rule), `lr_search` (the
lr at a batch size, by the fewest steps to a loss), `sweep` (the optional steps-to-target
sweep), `figure`. Loading the user's model and data lives in `batchlab.usercode`.
"""

from __future__ import annotations

from batchlab.recommend.decide import critical_batch, decide, lr_rule_from_sweep, scale_lr
from batchlab.recommend.run import recommend

__all__ = ["critical_batch", "decide", "lr_rule_from_sweep", "recommend", "scale_lr"]
