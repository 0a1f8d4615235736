"""RS: random masks at the same keep ratio, re-drawn on the same schedule as FS."""

from __future__ import annotations

import torch

import fsmtl_kernels as fk

from ..method import Method
from .base import SparseStrategy


class RandomSparse(SparseStrategy):
    """Each task keeps a uniformly random subset of ``keep_ratio`` of the masked trunk entries."""

    def compute_mask(self) -> fk.PackedMask:
        ctx = self.context
        num_tasks = len(ctx.tasks)
        scores = [
            torch.rand((num_tasks, *p.shape), generator=ctx.generator).to(p.device)
            for p in ctx.model.masked_parameters()
        ]
        return fk.topk_mask_batched(scores, self.keep_ratio)


def _random_sparse(options) -> RandomSparse:
    return RandomSparse(
        options.keep_ratio, schedule=options.schedule, mask_forward=options.mask_forward, normalize=options.normalize
    )


METHODS = (Method("rs", "RS", _random_sparse, RandomSparse, sparse=True),)
