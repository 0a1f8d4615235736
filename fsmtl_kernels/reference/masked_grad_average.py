from __future__ import annotations

import torch

from ..mask import PackedMask


def masked_grad_average(grads: list[torch.Tensor], mask: PackedMask, normalize: str, out: list[torch.Tensor]) -> None:
    """``out_i = sum_t S_ti * g_ti / T`` (``normalize="tasks"``) or divided by ``sum_t S_ti``
    (``normalize="selected"``, 0 where no task selected the entry).

    ``grads``: ``[T, *shape_i]`` fp16/bf16/fp32, summed in float32. ``out``: ``shape_i`` tensors,
    overwritten (cast to their own dtype).
    """
    num_tasks = mask.num_tasks
    for g, s, o in zip(grads, mask.to_bool_stacked(), out):
        total = (g.float() * s).sum(0)
        if normalize == "tasks":
            avg = total / num_tasks
        else:
            count = s.sum(0)
            avg = torch.where(count > 0, total / count.clamp_min(1), torch.zeros_like(total))
        o.copy_(avg)
