from __future__ import annotations

import torch


def masked_grad_average(
    grads: list[torch.Tensor], masks: list[torch.Tensor], normalize: str, out: list[torch.Tensor]
) -> None:
    """``out_i = sum_t S_ti * g_ti / T`` (``normalize="tasks"``) or divided by ``sum_t S_ti``
    (``normalize="selected"``, 0 where no task selected the entry).

    ``grads``: ``[T, *shape_i]`` fp16/bf16/fp32, summed in float32. ``masks``: bool ``[T, *shape_i]``
    (:meth:`fsmtl_kernels.PackedMask.to_bool_stacked`, unpacked once per mask). ``out``: ``shape_i``
    tensors, overwritten (cast to their own dtype).
    """
    for g, s, o in zip(grads, masks, out):
        total = (g.float() * s).sum(0)
        if normalize == "tasks":
            avg = total / s.shape[0]
        else:
            count = s.sum(0)
            avg = torch.where(count > 0, total / count.clamp_min(1), torch.zeros_like(total))
        o.copy_(avg)
