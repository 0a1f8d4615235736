"""RS: random masks at the same keep ratio, drawn once (the sparse-sharing literature, e.g. Sun et
al. 2020) or re-drawn on the same schedule as FS (``rs-redraw``)."""

from __future__ import annotations

import torch

import fsmtl_kernels as fk

from ..method import Method
from .base import SparseStrategy


class RandomSparse(SparseStrategy):
    """Each task keeps a uniformly random subset of ``keep_ratio`` of the masked trunk entries.

    Args:
        redraw: False (default) draws the masks once, at the first update the schedule makes due,
            and keeps them for the rest of training; True draws new ones at every scheduled update.
        Others as :class:`~fsmtl.strategies.sparse.base.SparseStrategy`.
    """

    def __init__(self, keep_ratio, *, redraw: bool = False, **kwargs) -> None:
        super().__init__(keep_ratio, **kwargs)
        self.redraw = bool(redraw)

    def on_step(self, epoch: int, step: int, epoch_start: bool) -> dict | None:
        if self.mask is not None and not self.redraw:
            return None  # fixed masks: drawn once
        return super().on_step(epoch, step, epoch_start)

    def compute_mask(self) -> fk.PackedMask:
        ctx = self.context
        num_tasks = len(ctx.tasks)
        scores = [
            torch.rand((num_tasks, *p.shape), generator=ctx.generator).to(p.device)
            for p in ctx.model.masked_parameters()
        ]
        return fk.topk_mask_batched(scores, self.keep_ratio)


def _random_sparse(redraw: bool, options) -> RandomSparse:
    return RandomSparse(
        options.keep_ratio,
        redraw=redraw,
        schedule=options.schedule,
        mask_forward=options.mask_forward,
        normalize=options.normalize,
    )


# ``rs-redraw`` is registered with the other variants (:mod:`.variants`), after the paper's methods.
METHODS = (
    Method("rs", "RS", lambda options: _random_sparse(False, options), RandomSparse, variant="fixed", sparse=True),
)
