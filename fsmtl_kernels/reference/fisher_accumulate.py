from __future__ import annotations

import torch


def fisher_accumulate(fisher: list[torch.Tensor], grads: list[torch.Tensor], scale: float, per_sample: bool) -> None:
    """``F_i += scale * sum_n g_in**2`` (per-sample ``[N, *shape_i]``) or ``F_i += scale * g_i**2``.

    ``fisher``: float32 tensors ``shape_i``, updated in place. ``grads``: fp16/bf16/fp32,
    upcast to float32 before squaring so half-precision squares cannot overflow.
    """
    for f, g in zip(fisher, grads):
        sq = g.float().square()
        if per_sample:
            sq = sq.sum(0)
        f.add_(sq, alpha=scale)
