from __future__ import annotations

import torch

from ..packed_mask import BITS, unpack_bits


def masked_accumulate(
    acc: list[torch.Tensor], grads: list[torch.Tensor], words: torch.Tensor, word_offsets: list[int], task: int
) -> None:
    """``acc_i += S_task,i * g_i`` in ``acc_i``'s dtype (float32 or float64), in place.

    ``g_i`` (fp16/bf16/fp32/fp64, shaped like ``acc_i``) is first converted to ``acc_i``'s dtype,
    then multiplied by the 0/1 mask bit (so a masked-out inf or NaN gives NaN, as in
    :func:`masked_grad_average`) and added: one rounding per entry, the same on every backend.
    Task ``task``'s bits of parameter ``i`` start at word ``word_offsets[i]`` of row ``task`` of
    ``words`` (int32 ``[T, W]``); only that row is unpacked, one parameter at a time.
    """
    for a, g, offset in zip(acc, grads, word_offsets):
        n = a.numel()
        if n == 0:
            continue
        bits = unpack_bits(words[task : task + 1, offset : offset + -(-n // BITS)], n).reshape(a.shape)
        a.add_(g.to(a.dtype) * bits)


def masked_accumulate_tasks(
    acc: list[torch.Tensor], grads: list[torch.Tensor], words: torch.Tensor, word_offsets: list[int], first_task: int
) -> None:
    """k tasks at once: ``grads[i]`` is ``[k, *shape_i]``, row ``j`` task ``first_task + j``'s
    gradient; the same as :func:`masked_accumulate` for each row in turn (the same roundings)."""
    k = grads[0].shape[0] if grads else 0
    for j in range(k):
        masked_accumulate(acc, [g[j] for g in grads], words, word_offsets, first_task + j)
