"""Trunks and :func:`build_model`: the small trunks of the built-in benchmarks (MLP, CNN, dense
CNN) and the paper's backbones in plain PyTorch (no torchvision): a ResNet-18 trunk for
CelebA-style 64x64 images and a SegNet-style encoder-decoder for Cityscapes. Each backbone names
its ``modulation_points`` (block outputs), where SE, task routing and maximum roaming act."""

from .build import BACKBONES, build_model
from .resnet import BasicBlock, ResNet18Trunk
from .segnet import SegNetTrunk, dense_head
from .trunks import cnn_trunk, dense_trunk, mlp_trunk

__all__ = [
    "BACKBONES",
    "BasicBlock",
    "ResNet18Trunk",
    "SegNetTrunk",
    "build_model",
    "cnn_trunk",
    "dense_head",
    "dense_trunk",
    "mlp_trunk",
]
