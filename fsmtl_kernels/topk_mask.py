"""``topk_mask`` / ``topk_mask_batched``: exact top-K over all entries of a list of score tensors.

The op ``torch.ops.fsmtl.topk_mask`` is defined here once; its kernels are
:func:`fsmtl_kernels.reference.topk_mask` (the semantics), ``csrc/topk_mask.cpp`` (CPU) and
:mod:`fsmtl_kernels.triton.topk_mask` (CUDA). The kernels write the mask in the word layout that
:func:`fsmtl_kernels.packed_mask.word_layout` gives them; none derives it itself.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from . import _checks, backends
from .packed_mask import PackedMask, word_layout

torch.library.define("fsmtl::topk_mask", "(Tensor[] scores, int[] ks, int[] word_offsets, int n_words) -> Tensor")


@torch.library.register_fake("fsmtl::topk_mask")
def _(scores, ks, word_offsets, n_words):
    return scores[0].new_empty((scores[0].shape[0], n_words), dtype=torch.int32)


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
    _checks.floating(items, "scores")
    num_tasks = items[0].shape[0]
    for i, s in enumerate(items):
        if s.shape[0] != num_tasks:
            raise ValueError(f"scores[{i}] has {s.shape[0]} tasks but scores[0] has {num_tasks}")
    shapes = tuple(s.shape[1:] for s in items)
    numels = [s.numel() for s in shapes]
    ks = _checks.resolve_ks(k, num_tasks, sum(numels))
    word_offsets, n_words = word_layout(numels)
    device = items[0].device
    if backends.select(backend, device).__name__ == "fsmtl_kernels.triton":
        # The Triton kernels read fp16/bf16/fp32 as they are and reject NaN scores themselves (in
        # the pass that reads every score anyway, or before the radix select for small inputs).
        words = backends.kernel("topk_mask", backend, device)(
            [s.contiguous() for s in items], ks, word_offsets, n_words
        )
        return PackedMask(words, shapes)
    _checks.no_nan(items, "scores")
    run = backends.kernel("topk_mask", backend, device)
    words = run([s.float().contiguous() for s in items], ks, word_offsets, n_words)
    return PackedMask(words, shapes)
