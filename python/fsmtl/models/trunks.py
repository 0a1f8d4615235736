"""The small trunks of the built-in benchmarks: an MLP for flat inputs, a CNN for images and a
resolution-preserving conv stack for per-pixel tasks."""

from __future__ import annotations

from torch import nn


def mlp_trunk(in_features: int, hidden: int = 128, depth: int = 2) -> nn.Sequential:
    layers: list[nn.Module] = []
    width = in_features
    for _ in range(depth):
        layers += [nn.Linear(width, hidden), nn.ReLU()]
        width = hidden
    return nn.Sequential(*layers)


def cnn_trunk(channels: int, hidden: int = 64) -> nn.Sequential:
    """Two conv blocks and global pooling: ``[N, C, H, W] -> [N, hidden]``."""
    return nn.Sequential(
        nn.Conv2d(channels, 32, 3, padding=1),
        nn.BatchNorm2d(32),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(32, hidden, 3, padding=1),
        nn.BatchNorm2d(hidden),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
    )


def dense_trunk(channels: int, hidden: int = 32) -> nn.Sequential:
    """Resolution-preserving conv stack for per-pixel tasks: ``[N, C, H, W] -> [N, hidden, H, W]``."""
    return nn.Sequential(
        nn.Conv2d(channels, hidden, 3, padding=1),
        nn.BatchNorm2d(hidden),
        nn.ReLU(),
        nn.Conv2d(hidden, hidden, 3, padding=2, dilation=2),
        nn.BatchNorm2d(hidden),
        nn.ReLU(),
    )
