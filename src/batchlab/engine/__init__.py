"""The training engine: one loop over K >= 1 models (`loop`), steppers that compute a step
(`steppers`: autograd, fused; `fused`, `deferred` the manual-backward kernels), the vectorized
grouping rule (`vectorized`), run setup (`setup`), schedules and the literature's schedule
recipes (`recipes`). It returns `TrainResult`s (`result`); storing them is `batchlab.runs`' job."""
