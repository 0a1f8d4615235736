"""A multi-task model fitted to a benchmark: a trunk chosen by name (or by the input shape) and
one head per task."""

from __future__ import annotations

import math

from torch import nn

from ..data import Benchmark
from ..model import MultiTaskModel
from ..tasks import task_kind
from .trunks import cnn_trunk, dense_trunk, mlp_trunk

#: Trunks by name for :func:`build_model` (``--model``); ``auto`` picks by the input shape.
BACKBONES = ("auto", "mlp", "cnn", "dense", "resnet18", "segnet")


def build_model(benchmark: Benchmark, *, hidden: int = 128, backbone: str = "auto") -> MultiTaskModel:
    """A trunk fitted to the benchmark's input shape and one head per task.

    ``backbone``: ``auto`` (an MLP for flat inputs, :func:`cnn_trunk` for images,
    :func:`dense_trunk` for per-pixel tasks; ``hidden`` sets their width), or one of
    :data:`BACKBONES` by name: ``resnet18`` (:class:`~fsmtl.models.ResNet18Trunk`, linear heads)
    and ``segnet`` (:class:`~fsmtl.models.SegNetTrunk`, MTAN's conv heads) ignore ``hidden``.
    """
    if backbone not in BACKBONES:
        raise ValueError(f"backbone must be one of {BACKBONES}, got {backbone!r}")
    shape = tuple(benchmark.input_shape)
    dense = any(task_kind(t.kind).dense for t in benchmark.tasks)
    if backbone == "auto":
        backbone = "dense" if dense else "cnn" if len(shape) == 3 else "mlp"
    if backbone in ("cnn", "dense", "resnet18", "segnet") and len(shape) != 3:
        raise ValueError(f"backbone {backbone!r} needs [C, H, W] inputs, the benchmark has {shape}")
    if dense != (backbone in ("dense", "segnet")):
        raise ValueError(f"backbone {backbone!r} does not fit {'per-pixel' if dense else 'per-sample'} tasks")
    if backbone == "segnet":
        from .segnet import SegNetTrunk, dense_head

        trunk = SegNetTrunk(shape[0])
        return MultiTaskModel(trunk, [dense_head(trunk.out_channels, t.num_outputs) for t in benchmark.tasks])
    if backbone == "dense":
        trunk, width = dense_trunk(shape[0], hidden=min(hidden, 64)), min(hidden, 64)
        return MultiTaskModel(trunk, [nn.Conv2d(width, t.num_outputs, 1) for t in benchmark.tasks])
    if backbone == "resnet18":
        from .resnet import ResNet18Trunk

        trunk = ResNet18Trunk(shape[0])
        width = trunk.out_features
    elif backbone == "cnn":
        trunk, width = cnn_trunk(shape[0], hidden=hidden), hidden
    else:
        trunk, width = mlp_trunk(math.prod(shape), hidden=hidden), hidden
    return MultiTaskModel(trunk, [nn.Linear(width, t.num_outputs) for t in benchmark.tasks])
