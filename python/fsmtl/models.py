"""Default models for the built-in benchmarks: an MLP trunk for flat inputs, a small CNN for
images, a small encoder-decoder for dense (per-pixel) tasks."""

from __future__ import annotations

import math

from torch import nn

from .data import Benchmark
from .model import MultiTaskModel
from .tasks import task_kind


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


def build_model(benchmark: Benchmark, *, hidden: int = 128) -> MultiTaskModel:
    """A trunk fitted to the benchmark's input shape and one head per task."""
    shape = tuple(benchmark.input_shape)
    dense = any(task_kind(t.kind).dense for t in benchmark.tasks)
    if dense:
        trunk, width = dense_trunk(shape[0], hidden=min(hidden, 64)), min(hidden, 64)
        heads = [nn.Conv2d(width, t.num_outputs, 1) for t in benchmark.tasks]
    elif len(shape) == 3:
        trunk, width = cnn_trunk(shape[0], hidden=hidden), hidden
        heads = [nn.Linear(width, t.num_outputs) for t in benchmark.tasks]
    else:
        trunk, width = mlp_trunk(math.prod(shape), hidden=hidden), hidden
        heads = [nn.Linear(width, t.num_outputs) for t in benchmark.tasks]
    return MultiTaskModel(trunk, heads)
