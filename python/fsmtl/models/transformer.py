"""A small attention trunk for the built-in benchmarks (``--model transformer``).

Images ``[C, H, W]`` are cut into ``patch x patch`` patches (a strided ``Conv2d``, as ViT does),
flat inputs ``[F]`` into tokens of ``token_size`` features (a ``Linear`` per token); a class token
and a learned positional table are added, then ``depth`` pre-norm ``nn.TransformerEncoderLayer``
blocks (``batch_first``, GELU) and a final ``LayerNorm``; the class token's features are the
trunk's output ``[N, width]``. Every parameter of it has an exact rule in the Fisher engine
(attention projections, sequence Linear, LayerNorm, the patch convolution, and the class token
and positional table through the broadcast rule), so FS costs about one backward per estimate.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn


class TransformerTrunk(nn.Module):
    """``[N, *input_shape] -> [N, width]``: tokens, class token, positions, encoder, class features.

    Args:
        input_shape: ``(C, H, W)`` (patches) or ``(F,)`` (feature tokens).
        width: model dimension ``d``; ``heads`` must divide it.
        depth: encoder layers.
        heads: attention heads.
        patch: patch side for images (``H`` and ``W`` must be multiples of it).
        token_size: features per token for flat inputs (``F`` must be a multiple of it).
        dropout: dropout of the encoder layers (off while the Fisher is estimated).
    """

    def __init__(
        self,
        input_shape: Sequence[int],
        width: int = 64,
        depth: int = 2,
        heads: int = 4,
        patch: int = 4,
        token_size: int = 4,
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        shape = tuple(int(s) for s in input_shape)
        if width % heads:
            raise ValueError(f"heads ({heads}) must divide width ({width})")
        if len(shape) == 3:
            c, h, w = shape
            if h % patch or w % patch:
                raise ValueError(f"image size {h}x{w} is not a multiple of patch {patch}")
            self.embed: nn.Module = nn.Conv2d(c, width, patch, stride=patch)
            tokens = (h // patch) * (w // patch)
        elif len(shape) == 1:
            if shape[0] % token_size:
                raise ValueError(f"{shape[0]} input features are not a multiple of token_size {token_size}")
            self.embed = nn.Linear(token_size, width)
            tokens = shape[0] // token_size
        else:
            raise ValueError(f"input_shape must be (C, H, W) or (F,), got {shape}")
        self.input_shape = shape
        self.token_size = token_size
        self.out_features = width
        self.cls = nn.Parameter(torch.zeros(1, 1, width))
        self.pos = nn.Parameter(torch.randn(1, tokens + 1, width) / math.sqrt(width))
        layer = nn.TransformerEncoderLayer(
            width, heads, 2 * width, dropout=dropout, activation="gelu", batch_first=True, norm_first=True
        )
        self.encoder = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(width)

    def tokens(self, x: torch.Tensor) -> torch.Tensor:
        """The input as tokens ``[N, L, width]`` (before the class token and positions)."""
        if len(self.input_shape) == 3:
            return self.embed(x).flatten(2).transpose(1, 2)
        return self.embed(x.reshape(x.shape[0], -1, self.token_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.tokens(x)
        h = torch.cat([self.cls.expand(h.shape[0], -1, -1), h], dim=1) + self.pos
        return self.norm(self.encoder(h))[:, 0]
