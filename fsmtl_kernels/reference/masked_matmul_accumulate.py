from __future__ import annotations

import torch

from ..packed_mask import BITS, unpack_bits


def masked_matmul_accumulate(
    acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor, words: torch.Tensor, word_offset: int, first_task: int
) -> None:
    """``acc += sum_{j < k} S_{first_task + j} * (a[j] @ b)`` in ``acc``'s dtype, in place.

    ``acc`` is ``[out, in]`` (float32 or float64), ``a`` ``[k, out, n]`` and ``b`` ``[n, in]``; the
    product ``a[j] @ b`` is computed in ``acc``'s dtype, multiplied by the 0/1 bit of task
    ``first_task + j`` (so a masked-out inf or NaN gives NaN) and added, one task after another.
    Flat entry ``f = o * in + i`` is bit ``f % 32`` of word ``words[first_task + j, word_offset + f // 32]``.
    """
    n = acc.numel()
    if n == 0:
        return
    rows = words[first_task : first_task + a.shape[0], word_offset : word_offset + -(-n // BITS)]
    bits = unpack_bits(rows, n).reshape(a.shape[0], *acc.shape)
    b = b.to(acc.dtype)
    for j in range(a.shape[0]):
        prod = a[j].to(acc.dtype) @ b
        acc.add_(prod * bits[j])
