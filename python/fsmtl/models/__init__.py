"""Trunks and :func:`build_model`: the small trunks of the built-in benchmarks (MLP, CNN, dense
CNN) and the paper's backbones in plain PyTorch (no torchvision): a ResNet-18 trunk for
CelebA-style 64x64 images and a SegNet-style encoder-decoder for Cityscapes. Each backbone names
its ``modulation_points`` (block outputs), where SE, task routing and maximum roaming act.
:class:`TransformerTrunk` is the attention trunk of ``--model transformer``; :class:`HFTrunk` makes
any Hugging Face ``transformers`` model a trunk (pooled, or per token with :class:`TokenHead`)."""

from .build import BACKBONES, build_model
from .hf import HFTrunk, TokenHead
from .resnet import BasicBlock, ResNet18Trunk
from .segnet import SegNetTrunk, dense_head
from .transformer import TransformerTrunk
from .trunks import cnn_trunk, dense_trunk, mlp_trunk

__all__ = [
    "BACKBONES",
    "BasicBlock",
    "HFTrunk",
    "ResNet18Trunk",
    "SegNetTrunk",
    "TokenHead",
    "TransformerTrunk",
    "build_model",
    "cnn_trunk",
    "dense_head",
    "dense_trunk",
    "mlp_trunk",
]
