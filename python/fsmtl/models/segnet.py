"""A SegNet-style encoder-decoder (Badrinarayanan et al., TPAMI 2017) as a dense multi-task trunk,
in the layout MTAN (Liu, Johns and Davison, CVPR 2019) and LibMTL use for Cityscapes:
``[N, 3, H, W] -> [N, 64, H, W]`` (H and W divisible by 32, e.g. 128x256)."""

from __future__ import annotations

import torch
from torch import nn


def _conv(in_channels: int, out_channels: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(in_channels, out_channels, 3, padding=1), nn.BatchNorm2d(out_channels), nn.ReLU())


class SegNetTrunk(nn.Module):
    """Five encoder stages (64, 128, 256, 512, 512 channels; one 3x3 conv-BN-ReLU then one more
    for the first two stages and two more for the last three, as MTAN's ``SegNet``), each followed
    by 2x2 max pooling with indices; five mirrored decoder stages (max unpooling, one conv to 512,
    256, 128, 64, 64 channels, then two more convs for the first three and one for the last two). Output: 64
    channels at the input resolution, for per-task heads (:func:`dense_head`).

    :attr:`modulation_points`: the output of every encoder and decoder stage (10 points).
    """

    out_channels = 64

    def __init__(self, in_channels: int = 3, widths: tuple[int, ...] = (64, 128, 256, 512, 512)) -> None:
        super().__init__()
        enc, dec = [], []
        channels = in_channels
        for i, width in enumerate(widths):
            extra = 1 if i < 2 else 2
            enc.append(nn.Sequential(_conv(channels, width), *[_conv(width, width) for _ in range(extra)]))
            channels = width
        outs = list(widths[:-1][::-1]) + [widths[0]]
        for i, width in enumerate(outs):
            extra = 1 if i >= len(widths) - 2 else 2
            dec.append(nn.Sequential(_conv(channels, width), *[_conv(width, width) for _ in range(extra)]))
            channels = width
        self.encoder = nn.ModuleList(enc)
        self.decoder = nn.ModuleList(dec)
        self.pool = nn.MaxPool2d(2, 2, return_indices=True)
        self.unpool = nn.MaxUnpool2d(2, 2)
        self.out_channels = outs[-1]
        self.modulation_points = [f"encoder.{i}" for i in range(len(enc))] + [f"decoder.{i}" for i in range(len(dec))]
        #: The units FSDP2 shards one by one (``MultiTaskModel.shard``): each stage.
        self.fsdp_units = list(self.modulation_points)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        indices, sizes = [], []
        for stage in self.encoder:
            x = stage(x)
            sizes.append(x.shape)
            x, idx = self.pool(x)
            indices.append(idx)
        for stage, idx, size in zip(self.decoder, reversed(indices), reversed(sizes)):
            x = stage(self.unpool(x, idx, output_size=size))
        return x


def dense_head(in_channels: int, out_channels: int) -> nn.Sequential:
    """MTAN's task head: a 3x3 conv to ``in_channels`` channels, then a 1x1 conv to the outputs."""
    return nn.Sequential(nn.Conv2d(in_channels, in_channels, 3, padding=1), nn.Conv2d(in_channels, out_channels, 1))
