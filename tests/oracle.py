"""Independent oracles the tests compare against: plain sorts and loops, no shared code with the package."""

from __future__ import annotations

import torch


def topk_oracle(scores: list[torch.Tensor], k: int) -> list[torch.Tensor]:
    """First k of a stable descending sort over all entries (with -0.0 read as +0.0), as bool masks."""
    flat = torch.cat([s.reshape(-1).double() for s in scores]) + 0.0
    order = sorted(range(flat.numel()), key=lambda i: (-flat[i].item(), i))
    chosen = torch.zeros(flat.numel(), dtype=torch.bool)
    chosen[order[:k]] = True
    out, start = [], 0
    for s in scores:
        out.append(chosen[start : start + s.numel()].reshape(s.shape))
        start += s.numel()
    return out


def fisher_oracle(grads: list[torch.Tensor], per_sample: bool) -> list[torch.Tensor]:
    """Sum of squares in float64."""
    return [(g.double() ** 2).sum(0) if per_sample else g.double() ** 2 for g in grads]


def masked_average_oracle(grads, masks, normalize: str) -> list[torch.Tensor]:
    """Loop over tasks in float64; ``masks`` are bool ``[T, *shape]``."""
    out = []
    for g, m in zip(grads, masks):
        total = torch.zeros(g.shape[1:], dtype=torch.float64)
        count = torch.zeros(g.shape[1:], dtype=torch.float64)
        for t in range(g.shape[0]):
            total += g[t].double() * m[t]
            count += m[t]
        if normalize == "tasks":
            out.append(total / g.shape[0])
        else:
            out.append(torch.where(count > 0, total / count.clamp_min(1), torch.zeros_like(total)))
    return out
