"""The language-model example (examples/tiny_lm.py) that the README's "bring your own
training" commands run: its data is deterministic next-token pairs, and one epoch of
`batchlab.train` with the next-token loss lowers its loss."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest
import torch

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "tiny_lm.py"


@pytest.fixture(scope="module")
def lm():
    spec = importlib.util.spec_from_file_location("tiny_lm_example", EXAMPLE)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_next_token_pairs_are_shifted_windows_and_deterministic(lm) -> None:
    xtr, ytr, xte, yte = lm.load()
    assert xtr.dtype == torch.long and xtr.shape[1] == lm.CONTEXT and len(xtr) > 1000
    assert torch.equal(xtr[:, 1:], ytr[:, :-1])  # y is x moved by one byte
    assert 0 < len(xte) < len(xtr) / 5 and int(xtr.max()) < lm.VOCAB
    again = lm.load()
    assert all(torch.equal(a, b) for a, b in zip((xtr, ytr, xte, yte), again))


def test_one_epoch_of_next_token_training_lowers_the_loss(lm) -> None:
    import batchlab

    torch.set_num_threads(1)
    xtr, ytr, xte, yte = lm.load()
    res = batchlab.train(model=lm.make, data=(xtr[:768], ytr[:768], xte[:128], yte[:128]),
                         loss="next_token", optimizer="adamw", lr=3e-3, batch_size=64,
                         epochs=1, seed=0)
    first, last = res.epochs[0]["train_loss"], res.epochs[-1]["train_loss"]
    assert res.status == "completed" and last < first
    assert first == pytest.approx(math.log(lm.VOCAB), rel=0.2)  # ~uniform over bytes at init
    assert math.isfinite(res.metric())
