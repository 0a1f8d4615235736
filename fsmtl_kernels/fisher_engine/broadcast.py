"""Per-sample gradients of tensors that enter the batch by broadcasting.

A learned positional table added to every sample (``h = tok_emb + pos``, a ViT's
``position_embeddings``), an ``nn.Embedding`` of position ids ``[1, L]`` (BERT, GPT-2), a class
token expanded over samples (``cls.expand(N, -1, -1)``), a layer scale or an RMSNorm weight
multiplied into every sample (``gamma * h``): such a tensor ``u`` has no sample dimension, so the
gradient the batched backward gives it is already summed over samples. Its per-sample gradient is
read one node later, at the op that broadcasts it, whose output has samples along dim 0:

* ``add`` / ``sub`` (``AddBackward0`` / ``SubBackward0``): ``alpha * g_n`` summed over the
  broadcast dimensions;
* ``mul`` (``MulBackward0``): ``g_n * other_n`` summed likewise (``other`` as autograd saved it);
* ``expand`` (``ExpandBackward0``): ``g_n`` summed likewise.

:func:`operand_rule` says whether a consumer node is one of these; :func:`per_sample_operand`
forms ``[N, *u.shape without a leading 1]`` from the gradient at the node's output (a pre-hook
reads it during the batched backward).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

Node = torch.autograd.graph.Node

_LINEAR_OPS = {"AddBackward0": 1.0, "SubBackward0": -1.0, "ExpandBackward0": 1.0}


def operand_rule(node: Node, index: int) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """For input ``index`` of ``node``: a function from the gradient at the node's output to the
    gradient of that input before the broadcast reduction, or None when the node is not a
    supported broadcasting op."""
    kind = type(node).__name__
    if kind in _LINEAR_OPS:
        coef = 1.0
        if kind != "ExpandBackward0" and index == 1:
            coef = _LINEAR_OPS[kind] * float(getattr(node, "_saved_alpha", 1))
        return (lambda g: g) if coef == 1.0 else (lambda g: g * coef)
    if kind == "MulBackward0":
        name = "_saved_other" if index == 0 else "_saved_self"
        try:
            other = getattr(node, name)
        except (AttributeError, RuntimeError):  # not saved (the other operand needs no gradient)
            return None
        if not isinstance(other, torch.Tensor):
            return None
        return lambda g: g * other
    return None


def per_sample_operand(grad: torch.Tensor, shape: torch.Size, n: int) -> torch.Tensor | None:
    """``[n, *rest]`` per-sample gradients of an operand of shape ``shape`` (``[1, *rest]`` or
    ``rest``, no sample dimension) broadcast into ``grad``'s shape ``[n, ...]``; None when
    ``grad`` has no samples along dim 0 or ``shape`` does not broadcast into it that way."""
    if grad.dim() == 0 or grad.shape[0] != n:
        return None
    rest = list(shape)
    if len(rest) == grad.dim():
        if rest[0] != 1:
            return None
        rest = rest[1:]
    if len(rest) > grad.dim() - 1:
        return None
    full = [1] * (grad.dim() - 1 - len(rest)) + rest
    dims = []
    for i, (want, have) in enumerate(zip(full, grad.shape[1:], strict=True)):
        if want != have:
            if want != 1:
                return None
            dims.append(i + 1)
    reduced = grad.sum(dims, keepdim=True) if dims else grad
    return reduced.reshape(n, *rest)
