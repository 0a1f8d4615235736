"""Hugging Face ``transformers`` models as the shared trunk (the extra ``fsmtl-kernels[hf]``).

:class:`HFTrunk` wraps any model that takes ``input_ids`` (or ``pixel_values``, ...) and returns a
``ModelOutput`` or a tuple whose first entry is the hidden states ``[N, L, d]``: an
``AutoModel.from_config(...)`` (BERT, GPT-2, ViT, Llama, ...) or a pretrained one. It builds the
attention mask from the padding token, so padded positions are masked in attention, left out of
the pooling, and contribute nothing to the Fisher estimate (their gradients are exactly zero), and
it pools the hidden states for per-sample heads (``cls``, ``mean``, ``last``) or keeps them for
per-token heads (``none`` with :class:`TokenHead`). ``transformers`` is imported only by
:meth:`HFTrunk.from_config`; wrapping a model you built needs nothing more.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

POOLINGS = ("cls", "mean", "last", "none")


def _transformers():
    try:
        import transformers
    except ImportError as exc:  # an optional extra: say how to get it
        raise ImportError(
            'fsmtl.models.HFTrunk.from_config needs Hugging Face transformers: pip install "fsmtl-kernels[hf]"'
        ) from exc
    return transformers


class HFTrunk(nn.Module):
    """A ``transformers`` model as ``MultiTaskModel``'s trunk: ``[N, L]`` token ids (or the
    model's own input) to pooled features ``[N, d]`` or hidden states ``[N, L, d]``.

    Args:
        model: the ``transformers`` model (or any module called as ``model(**{input_name: x,
            "attention_mask": mask})`` returning hidden states first).
        pooling: ``"cls"`` (first position: BERT, ViT), ``"mean"`` (over non-padded positions),
            ``"last"`` (last non-padded position: decoders such as GPT-2), ``"none"`` (all
            positions, for per-token heads).
        pad_token_id: the padding token of ``input_ids``; positions holding it are masked
            (``attention_mask``). None: no mask (every position is real, e.g. images).
        input_name: the keyword the model takes its input under (``"pixel_values"`` for ViT).
        output: the field of the model's output that holds the hidden states.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        pooling: str = "cls",
        pad_token_id: int | None = None,
        input_name: str = "input_ids",
        output: str = "last_hidden_state",
    ) -> None:
        super().__init__()
        if pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
        if pad_token_id is None and pooling in ("mean", "last") and input_name == "input_ids":
            pad_token_id = getattr(getattr(model, "config", None), "pad_token_id", None)
        self.model = model
        self.pooling = pooling
        self.pad_token_id = pad_token_id
        self.input_name = input_name
        self.output = output

    @classmethod
    def from_config(cls, config, **kwargs) -> HFTrunk:
        """``HFTrunk(transformers.AutoModel.from_config(config), **kwargs)``: random weights, no download."""
        return cls(_transformers().AutoModel.from_config(config), **kwargs)

    @property
    def out_features(self) -> int:
        """The width ``d`` of the features (``config.hidden_size``, or ``n_embd``)."""
        config = self.model.config
        return int(getattr(config, "hidden_size", None) or config.n_embd)

    def attention_mask(self, x: torch.Tensor) -> torch.Tensor | None:
        """1 at real positions, 0 at padding (None without a padding token)."""
        if self.pad_token_id is None or x.is_floating_point():
            return None
        return (x != self.pad_token_id).long()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mask = self.attention_mask(x)
        inputs = {self.input_name: x}
        if mask is not None:
            inputs["attention_mask"] = mask
        out = self.model(**inputs)
        hidden = out[self.output] if isinstance(out, Mapping) else out[0]
        if self.pooling == "none":
            return hidden
        if self.pooling == "cls":
            return hidden[:, 0]
        if mask is None:
            return hidden.mean(1) if self.pooling == "mean" else hidden[:, -1]
        if self.pooling == "mean":
            weights = mask.to(hidden.dtype).unsqueeze(-1)
            return (hidden * weights).sum(1) / weights.sum(1).clamp_min(1)
        last = (mask.sum(1) - 1).clamp_min(0)  # right padding: the last real position
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]


class TokenHead(nn.Module):
    """A per-token classification head: hidden states ``[N, L, d]`` to logits ``[N, C, 1, L]``.

    The layout is the ``segmentation`` task kind's (``[n, C, H, W]`` with ``H = 1``): a token task
    is a :class:`~fsmtl.tasks.Task` of kind ``"segmentation"`` with targets ``[N, 1, L]``, ``-1``
    at padded positions (ignored by the loss, so they contribute nothing to its Fisher either).
    """

    def __init__(self, width: int, num_classes: int) -> None:
        super().__init__()
        self.proj = nn.Linear(width, num_classes)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.proj(hidden).transpose(1, 2).unsqueeze(2)
