"""B_noise (Hessian-vector products by forward-over-reverse AD) on a model with attention:
PyTorch's fused attention kernels have no forward-mode derivative, which made `recommend`
fail with an internal error on any transformer (found on examples/tiny_lm.py)."""

from __future__ import annotations

import math

import torch
from torch import nn

from batchlab.measure.noise_curvature import b_noise


class Attn(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(11, 16)
        self.attn = nn.MultiheadAttention(16, 2, batch_first=True)
        self.head = nn.Linear(16, 11)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.emb(ids)
        mask = torch.triu(torch.ones(ids.shape[1], ids.shape[1], dtype=torch.bool), 1)
        return self.head(h + self.attn(h, h, h, attn_mask=mask, need_weights=False)[0])


def test_b_noise_on_a_model_with_attention_is_finite() -> None:
    torch.manual_seed(0)
    model = Attn()
    ids = torch.randint(0, 11, (24, 7))
    x, y = ids[:, :-1], ids[:, 1:]

    def loss(out: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return nn.functional.cross_entropy(out.reshape(-1, out.shape[-1]), t.reshape(-1))

    res = b_noise(model, x[:16], y[:16], x[16:], y[16:], loss_fn=loss)
    assert res.n == 16 and math.isfinite(res.trace_h_sigma) and math.isfinite(res.g_h_g)
