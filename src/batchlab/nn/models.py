"""Models: the MLP of the reproduced study and a LeNet-sized CNN, built so
`torch.func.functional_call` works on them.

Both end in log-softmax; the loss is the mean negative log-likelihood, exactly the study's
setting. Init `glorot` (Xavier-uniform weights, zero biases) gives the 784-1024-1024-10 net a
total weight norm of about 44, the study's starting point.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from batchlab.errors import ConfigError


class GhostBatchNorm1d(nn.BatchNorm1d):
    """BatchNorm over 'ghost' sub-batches of fixed size (Hoffer et al.): statistics are taken
    per chunk of `ghost_batch_size`, so a large batch normalizes like several small ones."""

    def __init__(self, num_features: int, ghost_batch_size: int | None = None) -> None:
        super().__init__(num_features)
        self.ghost_batch_size = ghost_batch_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g = self.ghost_batch_size
        if not self.training or g is None or x.shape[0] <= g:
            return super().forward(x)
        return torch.cat([super(GhostBatchNorm1d, self).forward(c) for c in x.split(g)])


class MLP(nn.Sequential):
    """Linear-ReLU stack ending in log-softmax. A Sequential so layers index as `net[i]`."""

    def __init__(
        self,
        input_dim: int = 784,
        hidden: tuple[int, ...] | list[int] = (1024, 1024),
        n_classes: int = 10,
        batchnorm: bool = False,
        ghost_batch_size: int | None = None,
    ) -> None:
        layers: list[nn.Module] = []
        prev = input_dim
        for h in hidden:
            layers.append(nn.Linear(prev, h))
            if batchnorm:
                layers.append(GhostBatchNorm1d(h, ghost_batch_size))
            layers.append(nn.ReLU())
            prev = h
        layers.append(nn.Linear(prev, n_classes))
        layers.append(nn.LogSoftmax(dim=-1))
        super().__init__(*layers)


class CNN(nn.Module):
    """LeNet-5-sized convolutional net: conv5x5(6)-ReLU-maxpool2, conv5x5(16)-ReLU-maxpool2,
    then 120-84-n_classes fully connected with ReLU, ending in log-softmax.

    The convolutions are padded ("same"), so any image of at least 4x4 works (28x28 -> 16x7x7,
    32x32 -> 16x8x8, 8x8 -> 16x2x2). Inputs may come flat ([N, C*H*W], as the built-in datasets
    are stored) or shaped; they are viewed as [N, C, H, W] with `input_shape` = (C, H, W) or
    (H, W) for one channel. About 107k parameters on MNIST."""

    def __init__(self, input_shape: tuple[int, ...] = (1, 28, 28), n_classes: int = 10) -> None:
        super().__init__()
        shape = tuple(input_shape)
        if len(shape) == 2:
            shape = (1, *shape)
        if len(shape) != 3 or min(shape[1:]) < 4:
            raise ConfigError(f"the cnn model needs images of shape (C, H, W) or (H, W) with "
                              f"H, W >= 4, got {tuple(input_shape)}")
        self.input_shape = shape
        c, h, w = shape
        self.features = nn.Sequential(
            nn.Conv2d(c, 6, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(6, 16, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
        )
        flat = 16 * (h // 4) * (w // 4)
        self.classifier = nn.Sequential(
            nn.Linear(flat, 120), nn.ReLU(), nn.Linear(120, 84), nn.ReLU(),
            nn.Linear(84, n_classes), nn.LogSoftmax(dim=-1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.reshape(x.shape[0], *self.input_shape)
        return self.classifier(self.features(x).flatten(1))


def init_weights(model: nn.Module, scheme: str, generator: torch.Generator) -> None:
    """Initialize every Linear and Conv2d layer in place from `generator` (so init is
    seed-determined). Fans of a convolution count its kernel: fan_in = C_in*kh*kw."""
    if scheme not in ("glorot", "torch", "kaiming"):
        raise ConfigError(f"unknown init {scheme!r}; choose glorot, torch or kaiming")
    with torch.no_grad():
        for m in model.modules():
            if not isinstance(m, (nn.Linear, nn.Conv2d)):
                continue
            rf = m.weight[0, 0].numel() if m.weight.dim() > 2 else 1
            fan_out, fan_in = m.weight.shape[0] * rf, m.weight.shape[1] * rf
            if scheme == "glorot":
                a = math.sqrt(6.0 / (fan_in + fan_out))
                m.weight.uniform_(-a, a, generator=generator)
                m.bias.zero_()
            elif scheme == "kaiming":
                std = math.sqrt(2.0 / fan_in)
                m.weight.normal_(0.0, std, generator=generator)
                m.bias.zero_()
            else:  # PyTorch's nn.Linear default: kaiming_uniform(a=sqrt(5)) and uniform bias
                bound = 1.0 / math.sqrt(fan_in)
                m.weight.uniform_(-bound, bound, generator=generator)
                m.bias.uniform_(-bound, bound, generator=generator)


def build_mlp(
    input_dim: int,
    hidden: list[int] | tuple[int, ...] = (1024, 1024),
    n_classes: int = 10,
    *,
    init: str = "glorot",
    seed: int = 0,
    batchnorm: bool = False,
    ghost_batch_size: int | None = None,
) -> MLP:
    """A freshly initialized MLP; the same arguments always give the same weights."""
    model = MLP(input_dim, hidden, n_classes, batchnorm, ghost_batch_size)
    g = torch.Generator().manual_seed(seed)
    init_weights(model, init, g)
    return model


def build_cnn(input_shape: tuple[int, ...], n_classes: int = 10, *, init: str = "glorot",
              seed: int = 0) -> CNN:
    """A freshly initialized CNN; the same arguments always give the same weights."""
    model = CNN(input_shape, n_classes)
    init_weights(model, init, torch.Generator().manual_seed(seed))
    return model


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
