from __future__ import annotations

import torch

from ..mask import pack_bits


def topk_mask(scores: list[torch.Tensor], ks: list[int]) -> torch.Tensor:
    """Exactly ``ks[t]`` ones per task: every score above the k-th largest ``thr``, then entries
    equal to ``thr`` in position order (parameter order, then flat index) until k are taken.

    ``scores``: float32 ``[T, *shape_i]``. Returns int32 words ``[T, W]`` in the layout of
    :mod:`fsmtl_kernels.mask`. ``-0.0`` equals ``+0.0``; ``+inf`` is the largest value.
    """
    num_tasks = scores[0].shape[0]
    flat = torch.cat([s.reshape(num_tasks, -1) for s in scores], dim=1) + 0.0  # -0.0 -> +0.0
    total = flat.shape[1]
    rows = []
    for t, k in enumerate(ks):
        row = flat[t]
        if k == 0:
            rows.append(torch.zeros(total, dtype=torch.bool, device=row.device))
            continue
        thr = torch.kthvalue(row, total - k + 1).values
        above = row > thr
        ties = row == thr
        need = k - int(above.sum())
        rows.append(above | (ties & (torch.cumsum(ties, 0) <= need)))
    bits = torch.stack(rows)
    out, start = [], 0
    for s in scores:
        n = s[0].numel()
        out.append(pack_bits(bits[:, start : start + n]))
        start += n
    return torch.cat(out, dim=1)
