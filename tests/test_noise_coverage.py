"""GradientNoiseScale's default coverage: LayerNorm, Embedding (repeated tokens, padding) and
Hugging Face GPT-2 (Conv1D projections covered; tied embeddings and the broadcast position
embedding reported), each against per-example autograd."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from torch import nn

from batchlab.measure.gns import GradientNoiseScale


def loop_sq(model: nn.Module, loss_fn, x: torch.Tensor, params: list[nn.Parameter]) -> torch.Tensor:
    out = []
    for i in range(len(x)):
        gs = torch.autograd.grad(loss_fn(model(x[i:i + 1])), params, allow_unused=True)
        out.append(sum(g.pow(2).sum() for g in gs if g is not None))
    return torch.stack(out)


class Tokens(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(7, 5, padding_idx=0)
        self.ln = nn.LayerNorm(5)
        self.out = nn.Linear(5, 3)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.out(self.ln(self.emb(ids))).mean(1)


def test_layernorm_and_embedding_are_covered_exactly() -> None:
    torch.manual_seed(0)
    model = Tokens()
    ids = torch.randint(0, 7, (6, 9), generator=torch.Generator().manual_seed(2))
    ids[0, :3] = 0  # padding
    ids[1] = 3  # one token repeated: the Gram form's cross terms
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing left out
        gns = GradientNoiseScale(model, reduction="sum")
    assert gns.coverage == 1.0 and set(gns.covered) == {"emb", "ln", "out"}

    def loss(out: torch.Tensor) -> torch.Tensor:
        return out.pow(2).sum()

    model.zero_grad()
    loss(model(ids)).backward()
    gns.step()
    ref = loop_sq(model, loss, ids, list(model.parameters()))
    assert torch.allclose(gns.last_sq_norms.float(), ref, rtol=1e-4, atol=1e-7)


def test_gpt2_conv1d_covered_tied_and_position_embeddings_reported() -> None:
    transformers = pytest.importorskip("transformers")
    cfg = transformers.GPT2Config(vocab_size=40, n_positions=16, n_embd=16, n_layer=1, n_head=2,
                                  resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(cfg).eval()  # no dropout: loop and batch agree
    with pytest.warns(RuntimeWarning, match="shares a parameter"):
        gns = GradientNoiseScale(model, reduction="sum")
    assert {"transformer.wte", "lm_head"} <= set(gns.unsupported)
    for name in ("transformer.h.0.attn.c_attn", "transformer.h.0.attn.c_proj",
                 "transformer.h.0.mlp.c_fc", "transformer.h.0.ln_1", "transformer.ln_f"):
        assert name in gns.covered
    ids = torch.randint(0, 40, (4, 10), generator=torch.Generator().manual_seed(3))

    def loss(out) -> torch.Tensor:
        return out.logits.float().pow(2).mean(-1).sum()

    model.zero_grad()
    with pytest.warns(RuntimeWarning, match="broadcasts over the batch"):
        loss(model(ids)).backward()
        gns.step()
    assert "transformer.wpe" in gns.unsupported
    params = list(gns._hooks.params())
    ref = loop_sq(model, loss, ids, params)
    assert torch.allclose(gns.last_sq_norms.float(), ref, rtol=1e-3, atol=1e-6)
    assert 0.5 < gns.coverage < 1.0


def test_b_noise_takes_integer_token_inputs() -> None:
    """The Hessian-vector product's vector has the parameters' dtype, not the inputs' (token
    ids are int64)."""
    from batchlab.measure.noise_curvature import b_noise
    from batchlab.task import NextToken

    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(11, 6), nn.Tanh(), nn.Linear(6, 11))
    g = torch.Generator().manual_seed(4)
    ids = torch.randint(0, 11, (40, 7), generator=g)
    nxt = (ids * 2 + 1) % 11
    res = b_noise(model, ids[:32], nxt[:32], ids[32:], nxt[32:], loss_fn=NextToken())
    assert res.n == 32 and res.hessian_batch == 8
    assert all(map(math.isfinite, (res.trace_h_sigma, res.g_h_g, res.grad_sq)))
