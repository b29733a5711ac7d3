"""The weight-geometry probe against values computed by hand on a 2-2-2 network."""

from __future__ import annotations

import math

import pytest
import torch

from batchlab.config import make_config
from batchlab.engine.train import train
from batchlab.nn.models import MLP
from batchlab.probes.geometry import geometry, snapshot, weight_layers


def _set(model: MLP, w1, b1, w2, b2) -> None:
    with torch.no_grad():
        for t, v in zip((model[0].weight, model[0].bias, model[2].weight, model[2].bias),
                        (w1, b1, w2, b2)):
            t.copy_(torch.tensor(v, dtype=torch.float32))


@pytest.fixture
def moved() -> tuple[MLP, dict[str, torch.Tensor]]:
    model = MLP(input_dim=2, hidden=[2], n_classes=2)
    _set(model, [[1, 0], [0, 1]], [0, 0], [[2, 0], [0, 0]], [1, 1])
    init = snapshot(model)
    _set(model, [[1, 0], [0, 2]], [3, 4], [[0, 2], [0, 0]], [1, 1])
    return model, init


def test_geometry_matches_hand_computed_values(moved):
    model, init = moved
    g = geometry(model, init)
    expected = {
        # layer 1: W moved by (0, +1) on the diagonal -> 1; b moved by (3, 4) -> 5
        "dist_init_layer1_w": 1.0, "dist_init_layer1_b": 5.0,
        # layer 2: W from [[2,0],[0,0]] to [[0,2],[0,0]] -> sqrt(8); b unchanged
        "dist_init_layer2_w": math.sqrt(8), "dist_init_layer2_b": 0.0,
        "dist_init_w": 3.0,  # sqrt(1 + 8)
        "dist_init_b": 5.0,
        "dist_init": math.sqrt(34),
        "norm_layer1_w": math.sqrt(5), "norm_layer2_w": 2.0,
        "norm_w": 3.0,  # sqrt(5 + 4)
        "norm_b": math.sqrt(27),  # |(3, 4)|^2 + |(1, 1)|^2
        "norm": 6.0,
        # cos([[1,0],[0,2]], I) = 3 / (sqrt 5 * sqrt 2); layer 2 moved to an orthogonal matrix
        "cos_init_layer1": 3 / math.sqrt(10), "cos_init_layer2": 0.0,
    }
    assert set(expected) <= set(g)
    for k, v in expected.items():
        assert g[k] == pytest.approx(v, abs=1e-6), k


def test_geometry_at_init_is_zero_distance_and_unit_cosine(moved):
    model, _ = moved
    g = geometry(model, snapshot(model))
    assert g["dist_init"] == 0.0 and g["dist_init_w"] == 0.0
    assert g["cos_init_layer1"] == pytest.approx(1.0) and g["cos_init_layer2"] == pytest.approx(1.0)
    assert g["norm"] == pytest.approx(6.0)


def test_weight_layers_are_the_linears_in_forward_order():
    model = MLP(input_dim=3, hidden=[4, 5], n_classes=2, batchnorm=True)
    names = [(n, m.out_features) for n, m in weight_layers(model)]
    assert names == [("layer1", 4), ("layer2", 5), ("layer3", 2)]


def test_probe_runs_every_epoch_and_matches_the_final_model():
    res = train(make_config(dataset="digits", hidden=[16], epochs=2, batch_size=128, lr=0.1))
    e0, last = res.epochs[0], res.epochs[-1]
    assert e0["dist_init"] == 0.0 and e0["cos_init_layer1"] == pytest.approx(1.0)
    assert all("dist_init_w" in e and "norm_layer2_w" in e for e in res.epochs)
    direct = geometry(res.model, res.init_state)
    for k in ("dist_init", "dist_init_w", "dist_init_b", "norm_w", "cos_init_layer2"):
        assert last[k] == pytest.approx(direct[k], rel=1e-6)
    assert last["dist_init"] > 0
    # the Glorot init has zero biases: the bias norm is the bias distance
    assert e0["norm_b"] == 0.0 and last["norm_b"] == pytest.approx(last["dist_init_b"])
