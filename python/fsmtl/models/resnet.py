"""ResNet-18 (He et al., CVPR 2016) as a multi-task trunk: ``[N, 3, H, W] -> [N, 512]``."""

from __future__ import annotations

import torch
from torch import nn


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers with an identity (or 1x1 conv-BN) shortcut, then ReLU."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.relu1 = nn.ReLU()
        self.relu2 = nn.ReLU()
        self.shortcut = nn.Sequential()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride, bias=False), nn.BatchNorm2d(out_channels)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        return self.relu2(self.bn2(self.conv2(out)) + self.shortcut(x))


class ResNet18Trunk(nn.Module):
    """The torchvision/He et al. ResNet-18 layout without its classifier: a 7x7/2 stem with 3x3/2
    max pooling, four stages of two :class:`BasicBlock` (64, 128, 256, 512 channels, stride 2 from
    the second stage), global average pooling. 11,176,512 parameters for 3 input channels (the
    11.7M of torchvision's ``resnet18`` minus its 1000-way ``fc``). A 64x64 image (the CelebA
    setting of the maximum-roaming harness) reaches the last stage at 2x2.

    :attr:`modulation_points`: the output of each of the 8 blocks (after the residual sum and
    ReLU), where Maninis et al. put their per-task SE modules.
    """

    out_features = 512

    def __init__(self, in_channels: int = 3, widths: tuple[int, int, int, int] = (64, 128, 256, 512)) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, widths[0], 7, 2, 3, bias=False),
            nn.BatchNorm2d(widths[0]),
            nn.ReLU(),
            nn.MaxPool2d(3, 2, 1),
        )
        stages = []
        channels = widths[0]
        for i, width in enumerate(widths):
            stride = 1 if i == 0 else 2
            stages.append(nn.Sequential(BasicBlock(channels, width, stride), BasicBlock(width, width)))
            channels = width
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.out_features = widths[-1]
        self.modulation_points = [f"layer{s}.{b}" for s in range(1, 5) for b in range(2)]
        #: The units FSDP2 shards one by one (``MultiTaskModel.shard``): the stem and each block.
        self.fsdp_units = ["stem", *self.modulation_points]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.pool(x).flatten(1)
