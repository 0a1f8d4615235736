from __future__ import annotations

import torch

from ..packed_mask import pack_bits


def topk_mask(scores: list[torch.Tensor], ks: list[int], word_offsets: list[int], n_words: int) -> torch.Tensor:
    """Exactly ``ks[t]`` ones per task: every score above the k-th largest ``thr``, then entries
    equal to ``thr`` in position order (parameter order, then flat index) until k are taken.

    ``scores``: float32 ``[T, *shape_i]``. Returns int32 words ``[T, n_words]``, parameter ``i``'s
    bits from word ``word_offsets[i]`` on (:mod:`fsmtl_kernels.packed_mask`). ``-0.0`` equals
    ``+0.0``; ``+inf`` is the largest value.
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
    words = torch.zeros(num_tasks, n_words, dtype=torch.int32, device=flat.device)
    start = 0
    for s, offset in zip(scores, word_offsets):
        n = s[0].numel()
        packed = pack_bits(bits[:, start : start + n])
        words[:, offset : offset + packed.shape[1]] = packed
        start += n
    return words
