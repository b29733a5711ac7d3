"""The GPU path, exercised on the CPU: no host sync inside the step loop.

On a GPU every `.item()`, `float(t)`, `bool(t)`, `.tolist()`, `.cpu()` or `.numpy()` of a device
tensor waits for the device to finish (a host sync); the engine promises to read losses once
per epoch (see `engine/loop.py`). The CPU cannot show a sync, but it can count the calls that
would be one: with four times as many steps per epoch (a quarter of the batch size), the same
number of epochs must make the same number of such calls.
"""

from __future__ import annotations

import pytest
import torch
from conftest import TINY

from batchlab import train
from batchlab.config import make_config

READS = ("item", "tolist", "cpu", "numpy", "__float__", "__bool__", "__int__")

pytestmark = pytest.mark.usefixtures("one_thread")


def reads_during(cfg) -> int:
    """How many host-reading tensor calls one training run makes."""
    count = [0]
    originals = {name: getattr(torch.Tensor, name) for name in READS}

    def counting(name):
        orig = originals[name]

        def f(self, *a, **k):
            count[0] += 1
            return orig(self, *a, **k)
        return f

    mp = pytest.MonkeyPatch()
    try:
        for name in READS:
            mp.setattr(torch.Tensor, name, counting(name))
        res = train(cfg)
    finally:
        mp.undo()
    assert res.status == "completed"
    return count[0]


@pytest.mark.parametrize("engine", ["autograd", "fused"])
def test_host_reads_do_not_grow_with_steps_per_epoch(engine: str) -> None:
    few = reads_during(make_config(**{**TINY, "batch_size": 128, "engine": engine}))
    many = reads_during(make_config(**{**TINY, "batch_size": 32, "engine": engine}))
    # 4x the steps (12 vs 45 per epoch): a per-step read would add >= 66 calls
    assert many == few, (few, many)
    assert few > 0  # the counter sees the per-epoch reads, so it can see per-step ones
