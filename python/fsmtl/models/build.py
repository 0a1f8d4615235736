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
BACKBONES = ("auto", "mlp", "cnn", "dense", "resnet18", "segnet", "mpnn", "mpnn-complete", "transformer")


def build_model(benchmark: Benchmark, *, hidden: int = 128, backbone: str = "auto") -> MultiTaskModel:
    """A trunk fitted to the benchmark's input shape and one head per task.

    ``backbone``: ``auto`` (an MLP for flat inputs, :func:`cnn_trunk` for images,
    :func:`dense_trunk` for per-pixel tasks; ``hidden`` sets their width), or one of
    :data:`BACKBONES` by name: ``resnet18`` (:class:`~fsmtl.models.ResNet18Trunk`, linear heads)
    and ``segnet`` (:class:`~fsmtl.models.SegNetTrunk`, MTAN's conv heads) ignore ``hidden``;
    ``transformer`` (:class:`~fsmtl.models.TransformerTrunk`: patches of images or tokens of flat
    features, 2 encoder layers of width ``min(hidden, 64)``, class-token features, linear heads);
    ``mpnn`` / ``mpnn-complete`` (:class:`~fsmtl.models.mpnn.MPNNTrunk` on the bonded or the complete
    graph, width 64, linear heads; ``auto`` picks ``mpnn`` for the ``qm9`` benchmark) ignore ``hidden``.
    """
    if backbone not in BACKBONES:
        raise ValueError(f"backbone must be one of {BACKBONES}, got {backbone!r}")
    shape = tuple(benchmark.input_shape)
    dense = any(task_kind(t.kind).dense for t in benchmark.tasks)
    if backbone == "auto" and benchmark.name == "qm9":
        backbone = "mpnn"
    if backbone.startswith("mpnn"):
        from ..data.qm9 import INPUT_SHAPE
        from .mpnn import MPNNTrunk

        if shape != INPUT_SHAPE:
            raise ValueError(f"backbone {backbone!r} needs packed molecules {INPUT_SHAPE} (benchmark qm9), got {shape}")
        trunk = MPNNTrunk(graph="complete" if backbone == "mpnn-complete" else "bonded")
        return MultiTaskModel(trunk, [nn.Linear(trunk.out_features, t.num_outputs) for t in benchmark.tasks])
    if backbone == "auto":
        backbone = "dense" if dense else "cnn" if len(shape) == 3 else "mlp"
    if backbone == "transformer":
        if dense:
            raise ValueError("backbone 'transformer' does not fit per-pixel tasks")
        from .transformer import TransformerTrunk

        trunk = TransformerTrunk(shape, width=min(hidden, 64), **_token_geometry(shape))
        return MultiTaskModel(trunk, [nn.Linear(trunk.out_features, t.num_outputs) for t in benchmark.tasks])
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


def _token_geometry(shape: tuple[int, ...]) -> dict[str, int]:
    """Patches of 4x4 pixels on images of side >= 16 (else 2x2, or 1x1 for odd sizes), tokens of 4
    features (2 or 1)."""
    if len(shape) == 3:
        side = min(shape[1:])
        fits = [p for p in (4, 2) if shape[1] % p == 0 and shape[2] % p == 0 and side // p >= (4 if p == 4 else 2)]
        return {"patch": fits[0] if fits else 1}
    return {"token_size": next(k for k in (4, 2, 1) if shape[0] % k == 0)}
