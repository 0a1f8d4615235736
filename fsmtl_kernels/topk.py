"""Top-K selection over all entries of a list of score tensors, one task or a batch of tasks."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from . import _checks, backends
from .mask import PackedMask

SCORE_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def topk_mask(scores: Sequence[torch.Tensor], k: int | float, *, backend: str = "auto") -> PackedMask:
    """Mask of the ``k`` largest scores over all entries of ``scores`` (one task).

    Exactly ``k`` ones: every entry above the k-th largest score ``thr``, then entries equal
    to ``thr`` in position order (parameter order, then row-major flat index) until ``k`` are
    taken; this equals the first ``k`` of a stable descending sort. ``-0.0 == +0.0`` and
    ``+inf`` is the largest value. NaN scores are rejected.

    Args:
        scores: tensors ``shape_i`` (fp16/bf16/fp32, compared as float32), e.g. Fisher buffers.
        k: an ``int`` count in ``[0, P]`` (``P`` = total entries), or a ``float`` keep ratio
            ``p`` in ``(0, 1]`` giving ``k = floor(p * P + 1/2)`` on the exact binary value of
            ``p`` (half-way cases round up: 0.5 of 3 entries keeps 2). ``bool`` is rejected.
        backend: ``"auto" | "reference" | "triton" | "cpp"``.

    Returns:
        :class:`PackedMask` with one task.
    """
    items = _checks.tensor_list(scores, "scores")
    return topk_mask_batched([s.unsqueeze(0) for s in items], k, backend=backend)


def topk_mask_batched(scores: Sequence[torch.Tensor], k, *, backend: str = "auto") -> PackedMask:
    """:func:`topk_mask` for T tasks at once.

    Args:
        scores: tensors ``[T, *shape_i]``, one per parameter; row ``t`` holds task ``t``'s scores.
        k: one count/ratio for all tasks, or a list of T of them.

    Returns:
        :class:`PackedMask` with T tasks, ``k_t`` ones in row ``t``.
    """
    items = _checks.tensor_list(scores, "scores", min_dim=1)
    _checks.floating(items, "scores", SCORE_DTYPES)
    num_tasks = items[0].shape[0]
    for i, s in enumerate(items):
        if s.shape[0] != num_tasks:
            raise ValueError(f"scores[{i}] has {s.shape[0]} tasks but scores[0] has {num_tasks}")
    total = sum(s[0].numel() for s in items)
    ks = _checks.resolve_ks(k, num_tasks, total)
    _checks.no_nan(items, "scores")
    impl = backends.select(backend, items[0].device)
    words = impl.topk_mask([s.float().contiguous() for s in items], ks)
    return PackedMask(words, tuple(s.shape[1:] for s in items))
