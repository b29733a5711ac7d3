"""GradientNoiseScale under AMP practice: a step with inf gradients (the one GradScaler skips)
leaves the averages as they were, and loss scaling (changing between steps) is taken out."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from batchlab.measure.gns import GradientNoiseScale


def batches(n: int, b: int = 16, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(6, 1, generator=g)
    out = []
    for _ in range(n):
        x = torch.randn(b, 6, generator=g)
        out.append((x, x @ w + 0.5 * torch.randn(b, 1, generator=g)))
    return out


def test_an_inf_gradient_step_does_not_poison_the_average() -> None:
    torch.manual_seed(0)
    net = nn.Linear(6, 1)
    gns = GradientNoiseScale(net, beta=0.9)
    data = batches(6)
    for i, (x, y) in enumerate(data):
        if i == 3:  # an overflowing batch: every gradient is inf/nan
            x = torch.full_like(x, float("inf"))
        net.zero_grad()
        F.mse_loss(net(x), y).backward()
        gns.step()
        if i == 2:
            before = (gns.b_simple, gns.grad_sq, gns.trace_sigma)
        if i == 3:
            assert (gns.b_simple, gns.grad_sq, gns.trace_sigma) == before
    hist = gns.history
    assert hist[3].skipped and not any(h.skipped for h in hist[:3] + hist[4:])
    assert all(math.isfinite(h.b_simple) for h in hist)
    assert math.isfinite(gns.b_simple) and gns.b_simple > 0
    # the averages equal those of the same loop without the bad batch
    torch.manual_seed(0)
    ref_net = nn.Linear(6, 1)
    ref = GradientNoiseScale(ref_net, beta=0.9)
    for i, (x, y) in enumerate(data):
        if i == 3:
            continue
        ref_net.zero_grad()
        F.mse_loss(ref_net(x), y).backward()
        ref.step()
    assert gns.b_simple == pytest.approx(ref.b_simple, rel=1e-9)


@pytest.mark.parametrize("unscale_first", [False, True])
def test_loss_scaling_is_taken_out_before_averaging(unscale_first: bool) -> None:
    """Under a GradScaler whose scale changes every step, B_simple equals the unscaled loop's
    (without the scaler the EMA would mix units: 2**4 vs 2**12 squared)."""
    data = batches(5)
    torch.manual_seed(0)
    net = nn.Linear(6, 1)
    opt = torch.optim.SGD(net.parameters(), lr=0.0)  # lr 0: the weights stay equal to ref's
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**4, growth_factor=4.0, growth_interval=1)
    gns = GradientNoiseScale(net, beta=0.5, scaler=scaler)
    torch.manual_seed(0)
    ref_net = nn.Linear(6, 1)
    ref = GradientNoiseScale(ref_net, beta=0.5)
    scales = []
    for x, y in data:
        opt.zero_grad()
        scaler.scale(F.mse_loss(net(x), y)).backward()
        if unscale_first:
            scaler.unscale_(opt)
        gns.step()
        scales.append(scaler.get_scale())
        scaler.step(opt)
        scaler.update()
        ref_net.zero_grad()
        F.mse_loss(ref_net(x), y).backward()
        ref.step()
    assert len(set(scales)) == len(scales)  # the scale really changed every step
    assert gns.b_simple == pytest.approx(ref.b_simple, rel=1e-6)
    assert gns.grad_sq == pytest.approx(ref.grad_sq, rel=1e-6)


def test_per_example_monitor_refuses_a_ddp_model(tmp_path) -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    from batchlab.errors import BatchlabError

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'init'}", rank=0, world_size=1)
    try:
        with pytest.raises(BatchlabError, match="MicroBatchNoiseScale"):
            GradientNoiseScale(DDP(nn.Linear(3, 1)))
    finally:
        dist.destroy_process_group()
