"""MicroBatchNoiseScale: gradient accumulation and DDP (2 gloo processes on the CPU) give the
same B_simple as one process, both recover the closed form on a linear model, every parameter
(tied embeddings of a Hugging Face GPT-2 included) is covered, and a non-finite step is skipped."""

from __future__ import annotations

import math
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from batchlab.errors import BatchlabError
from batchlab.measure.noise_micro import MicroBatchNoiseScale

N, D, MICRO, STEPS = 2048, 5, 8, 300


def population() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(N, D, generator=g)
    w_true = torch.randn(D, 1, generator=g)
    y = x @ w_true + 0.7 * torch.randn(N, 1, generator=g)
    w0 = torch.zeros(D, 1)  # the weights measured at (lr 0: they stay)
    return x, y, w0


def closed_form(x: torch.Tensor, y: torch.Tensor, w: torch.Tensor) -> float:
    """tr(Sigma)/|G|^2 of the population (examples drawn uniformly with replacement):
    per-example gradient of (x.w - y)^2 is 2 (x.w - y) x."""
    g = 2 * (x @ w - y) * x
    mean = g.mean(0)
    return float(((g - mean).pow(2).sum(1).mean()) / mean.pow(2).sum())


def draws(step: int, count: int) -> torch.Tensor:
    return torch.randint(0, N, (count,), generator=torch.Generator().manual_seed(1000 + step))


def run_loop(rank: int, world: int, k: int, model: nn.Module, big_from: str = "auto",
             clip: float | None = None) -> MicroBatchNoiseScale:
    """STEPS optimizer steps (lr 0) of world x k micro-batches; rank r takes micro-batches
    r*k .. r*k + k - 1 of each step's draw (so every layout sees the same examples)."""
    x, y, _ = population()
    gns = MicroBatchNoiseScale(model, micro_batch_size=MICRO, beta=0.995, big_from=big_from)
    for s in range(STEPS):
        idx = draws(s, world * k * MICRO).view(world * k, MICRO)
        model.zero_grad()
        for j in range(k):
            part = idx[rank * k + j]
            ctx = model.no_sync() if isinstance(model, DDP) and j < k - 1 else _null()
            with ctx:
                (torch.nn.functional.mse_loss(model(x[part]), y[part]) / k).backward()
        if clip is not None:  # as Hugging Face's Trainer: clipped before the callback runs
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        gns.step()
    return gns


class _null:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *a: object) -> None:
        return None


def linear() -> nn.Module:
    net = nn.Linear(D, 1, bias=False)
    with torch.no_grad():
        net.weight.zero_()
    return net


def _ddp_worker(rank: int, world: int, path: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{path}", rank=rank, world_size=world)
    try:
        res = {}
        for big_from in ("grad", "hooks"):
            gns = run_loop(rank, world, 2, DDP(linear()), big_from)
            res[big_from] = {"b_simple": gns.b_simple, "grad_sq": gns.grad_sq,
                             "trace_sigma": gns.trace_sigma}
        torch.save(res, f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ddp_result(tmp_path_factory) -> list[dict[str, float]]:
    d = tmp_path_factory.mktemp("ddp")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    mp.spawn(_ddp_worker, args=(2, str(d / "init"), str(d / "res")), nprocs=2, join=True)
    return [torch.load(d / f"res.{r}") for r in range(2)]


def test_accumulation_recovers_the_closed_form_and_ignores_clipping() -> None:
    x, y, w0 = population()
    gns = run_loop(0, 1, 4, linear())
    assert gns.coverage == 1.0
    assert gns.b_simple == pytest.approx(closed_form(x, y, w0), rel=0.10)
    assert all(h.batch_size == 4 * MICRO for h in gns.history)
    # |G_big|^2 from the hooks (the default with accumulation) is the pre-clip norm
    clipped = run_loop(0, 1, 4, linear(), clip=1e-3)
    assert clipped.b_simple == pytest.approx(gns.b_simple, rel=1e-9)
    from_grad = run_loop(0, 1, 4, linear(), big_from="grad")
    assert from_grad.b_simple == pytest.approx(gns.b_simple, rel=1e-6)


def test_ddp_on_two_gloo_processes_equals_one_process(ddp_result) -> None:
    one = run_loop(0, 1, 4, linear())  # the same 32 examples per step in one process
    x, y, w0 = population()
    for r in ddp_result:  # every rank holds the same answer
        # .grad all-reduced: B_big = 2 micro-batches x 2 ranks, exactly the one-process loop
        assert r["grad"]["b_simple"] == pytest.approx(one.b_simple, rel=1e-6)
        assert r["grad"]["grad_sq"] == pytest.approx(one.grad_sq, rel=1e-6)
        # each rank's own pair (B_big = 2 micro-batches), averaged over the ranks
        assert r["hooks"]["b_simple"] == pytest.approx(one.b_simple, rel=0.10)
        for v in r.values():
            assert v["b_simple"] == pytest.approx(closed_form(x, y, w0), rel=0.10)
    assert ddp_result[0] == ddp_result[1]


def test_per_rank_batches_alone_are_enough() -> None:
    """W = 2, k = 1 is the per-rank estimator; here checked in one process as k = 2 on the
    same examples (a rank's micro-batch is one of the two)."""
    x, y, w0 = population()
    gns = run_loop(0, 1, 2, linear())
    assert gns.b_simple == pytest.approx(closed_form(x, y, w0), rel=0.15)


def test_every_parameter_of_gpt2_with_tied_embeddings_is_covered() -> None:
    transformers = pytest.importorskip("transformers")
    cfg = transformers.GPT2Config(vocab_size=50, n_positions=16, n_embd=16, n_layer=1, n_head=2)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(cfg)
    assert model.lm_head.weight is model.transformer.wte.weight  # tied
    gns = MicroBatchNoiseScale(model, micro_batch_size=4, beta=0.0)
    ids = torch.randint(0, 50, (8, 12), generator=torch.Generator().manual_seed(1))
    model.zero_grad()
    sq_micro = 0.0
    for part in ids.split(4):
        before = [p.grad.clone() if p.grad is not None else torch.zeros_like(p)
                  for p in model.parameters()]
        (model(part, labels=part).loss / 2).backward()
        sq_micro += sum(float((p.grad - b).pow(2).sum()) for p, b in zip(model.parameters(), before))
    gns.step()
    big = sum(float(p.grad.pow(2).sum()) for p in model.parameters())
    rec = gns.history[0]
    # the hooks' micro-batch norms are those of the gradient deltas of ALL parameters (the tied
    # matrix once, with both uses summed); |G_big|^2 is the accumulated .grad's
    assert rec.g_small_sq == pytest.approx(sq_micro * 4 / 2, rel=1e-5)
    assert rec.g_big_sq == pytest.approx(big, rel=1e-6)
    gns.close()


def test_a_non_finite_step_is_skipped_and_misuse_is_one_line() -> None:
    x, y, _ = population()
    net = linear()
    gns = MicroBatchNoiseScale(net, micro_batch_size=4, beta=0.5)
    for s in range(4):
        net.zero_grad()
        for j in range(2):
            xb = x[8 * s + 4 * j: 8 * s + 4 * j + 4]
            if s == 2:
                xb = torch.full_like(xb, float("inf"))
            (torch.nn.functional.mse_loss(net(xb), y[:4]) / 2).backward()
        gns.step()
        if s == 1:
            before = gns.b_simple
        if s == 2:
            assert gns.b_simple == before
    assert [h.skipped for h in gns.history] == [False, False, True, False]
    assert math.isfinite(gns.b_simple)
    with pytest.raises(BatchlabError, match="single batch size"):
        net.zero_grad()
        torch.nn.functional.mse_loss(net(x[:4]), y[:4]).backward()
        gns.step()
    with pytest.raises(BatchlabError, match="no backward pass"):
        gns.step()
