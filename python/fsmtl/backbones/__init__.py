"""The paper's backbones in plain PyTorch (no torchvision): a ResNet-18 trunk for CelebA-style
64x64 images and a SegNet-style encoder-decoder for Cityscapes. Each trunk names its
``modulation_points`` (block outputs), where SE, task routing and maximum roaming act."""

from .resnet import BasicBlock, ResNet18Trunk
from .segnet import SegNetTrunk, dense_head

__all__ = ["BasicBlock", "ResNet18Trunk", "SegNetTrunk", "dense_head"]
