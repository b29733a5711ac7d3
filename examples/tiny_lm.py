"""A tiny causal character-level language model and its data, for `--model` / `--data`.

Why it is here: batchlab's own experiments are MNIST classifiers; this is what a practitioner
brings instead - token ids in, next-token logits out, trained with `--loss next_token` (mean
cross-entropy over every position; the metric is perplexity), AdamW, bf16 autocast.

The corpus is the text of this repository's README and docs (read relative to this file): no
network, and deterministic for a given commit. Characters map to bytes (vocabulary 256);
training pairs are windows of CONTEXT bytes and the same windows shifted by one.

    PYTHONPATH=examples batchlab train --model tiny_lm:make --data tiny_lm:load \
        --loss next_token --optimizer adamw --lr 3e-3 --batch-size 64 --epochs 2
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

CONTEXT = 32
VOCAB = 256
STRIDE = 8  # windows start every STRIDE bytes (overlapping, as language-model batches do)
ROOT = Path(__file__).resolve().parents[1]


class TinyLM(nn.Module):
    """Embeddings, one causal self-attention layer and an MLP block (pre-LayerNorm)."""

    def __init__(self, d: int = 64, heads: int = 4) -> None:
        super().__init__()
        self.tok = nn.Embedding(VOCAB, d)
        self.pos = nn.Embedding(CONTEXT, d)
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.attn = nn.MultiheadAttention(d, heads, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))
        self.head = nn.Linear(d, VOCAB)
        mask = torch.triu(torch.ones(CONTEXT, CONTEXT, dtype=torch.bool), diagonal=1)
        self.register_buffer("mask", mask, persistent=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        t = ids.shape[1]
        h = self.tok(ids) + self.pos(torch.arange(t, device=ids.device))
        a = self.ln1(h)
        h = h + self.attn(a, a, a, attn_mask=self.mask[:t, :t], need_weights=False)[0]
        return self.head(h + self.mlp(self.ln2(h)))  # [batch, time, vocab] logits


def make() -> nn.Module:
    return TinyLM()


def corpus() -> bytes:
    files = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    return b"\n".join(f.read_bytes() for f in files if f.is_file())


def load() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(X_train, y_train, X_test, y_test): int64 windows [N, CONTEXT] and their next bytes;
    the last 10% of the text is the test set (no window crosses the split)."""
    data = torch.tensor(list(corpus()), dtype=torch.long)
    cut = int(0.9 * len(data))

    def windows(seq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        w = seq.unfold(0, CONTEXT + 1, STRIDE)
        return w[:, :-1].contiguous(), w[:, 1:].contiguous()

    return (*windows(data[:cut]), *windows(data[cut:]))
