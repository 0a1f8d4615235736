"""Variants of Fisher sparse training that isolate one ingredient of the method each.

* ``per_layer``: every layer (masked parameter tensor) keeps the share p of its own entries, instead
  of the paper's global top-K over the whole trunk (Eq. 11), which may empty some layers.
* ``masked_fisher``: the Fisher scores of task t are computed on the task's own sparse network
  ``S_t * theta_sh`` (the network its forward runs under ``mask_forward``, Eq. 3) instead of the
  dense trunk. The scores are gradients with respect to the *effective* weights, so an entry outside
  the mask is scored by how much the task's likelihood would change if it were switched on (a
  gradient taken through ``torch.where`` would be exactly 0 there, and the mask could never change).
  The first mask, before any exists, is scored on the dense trunk.
* the update order: plain ``fs`` follows the paper (tasks updated in turns on homogeneous
  benchmarks, the averaged masked gradient on heterogeneous ones: :mod:`.fisher`). ``fs-avg``
  always takes one update with the average ``sum_t S_t g_t / T``; ``fs-turns``
  (:class:`FisherSparseInTurns`) always updates in turns (T optimizer updates per step, task t's
  loss recomputed on the parameters task t - 1's update left); ``mtl-turns``
  (:class:`EqualWeightingInTurns`) is dense MTL in turns, so that ``mtl`` / ``mtl-turns`` /
  ``fs-avg`` / ``fs`` separate the effect of the update order from that of the masks. The
  :class:`~fsmtl.engine.Trainer` runs the turns when the strategy's ``in_turns`` is True, calling
  :meth:`backward_task` once per task.
* STL with Fisher-sparse updates (method ``stl-fs``): one model per task, each trained with its own
  Fisher mask; it has sparsity without sharing, so comparing it with FS separates the two effects.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from functools import partial

import torch

import fsmtl_kernels as fk

from ...estimators import task_scores
from ..method import Method
from ..weighting.equal import EqualWeighting
from .fisher import FisherSparse, _fisher_sparse, task_backward
from .random import RandomSparse, _random_sparse


def per_layer_topk(scores: Sequence[torch.Tensor], keep_ratio: float) -> fk.PackedMask:
    """Each task keeps, in every tensor of ``scores`` (``[T, *shape]``), its top
    ``k_l = max(1, floor(p * n_l + 1/2))`` of the tensor's ``n_l`` entries (ties: torch.topk's)."""
    if isinstance(keep_ratio, bool) or not isinstance(keep_ratio, float) or not 0.0 < keep_ratio <= 1.0:
        raise ValueError(f"a per-layer keep ratio must be a float in (0, 1], got {keep_ratio!r}")
    marks, total = [], 0
    for s in scores:
        flat = s.reshape(s.shape[0], -1)
        k = max(1, int(keep_ratio * flat.shape[1] + 0.5))
        top = torch.zeros_like(flat, dtype=torch.float32)
        top.scatter_(1, flat.topk(k, dim=1).indices, 1.0)
        marks.append(top.reshape(s.shape))
        total += k
    # Every task has exactly `total` ones: the global top-`total` of the marks is exactly them.
    return fk.topk_mask_batched(marks, total)


def task_masks(mask: fk.PackedMask) -> list[list[torch.Tensor]]:
    """Per task, bool tensors shaped like the masked parameters."""
    stacked = mask.to_bool_stacked()
    return [[m[t] for m in stacked] for t in range(mask.num_tasks)]


def masked_network_scores(model, t: int, task, inputs, targets, mask: Sequence[torch.Tensor], estimator: str, chunk):
    """Task ``t``'s scores on its own sparse network: a copy of the model whose masked parameters are
    zero outside ``mask`` (the parameters of ``model`` are untouched)."""
    sparse = copy.deepcopy(model)
    with torch.no_grad():
        for p, m in zip(sparse.masked_parameters(), mask):
            p.masked_fill_(~m, 0.0)
    return task_scores(sparse, t, task, inputs, targets, estimator, chunk_size=chunk)


class FisherSparseVariant(FisherSparse):
    """:class:`FisherSparse` with the ``per_layer`` and ``masked_fisher`` choices of this module.

    Args:
        per_layer: keep the share ``keep_ratio`` of every masked parameter tensor (a float ratio).
        masked_fisher: score each task on its own sparse network once it has a mask.
        Others as :class:`FisherSparse`.
    """

    def __init__(self, keep_ratio, *, per_layer: bool = False, masked_fisher: bool = False, **kwargs) -> None:
        super().__init__(keep_ratio, **kwargs)
        if per_layer and not isinstance(keep_ratio, float):
            raise ValueError(f"per_layer needs a float keep ratio in (0, 1], got {keep_ratio!r}")
        self.per_layer = bool(per_layer)
        self.masked_fisher = bool(masked_fisher)

    def sharding_unsupported(self) -> str | None:
        if self.per_layer or self.masked_fisher:
            return "the per-layer and masked-network Fisher variants score the sharded model itself, not a full copy"
        return super().sharding_unsupported()

    def compute_mask(self) -> fk.PackedMask:
        ctx = self.context
        if not self.per_layer and (not self.masked_fisher or self.mask is None):
            return self.fsmtl.fisher_masks(ctx.sample)  # FS's own masks (the first masked-network ones too)
        batches = [ctx.sample(t, self.samples) for t in range(len(ctx.tasks))]
        current = task_masks(self.mask) if self.masked_fisher and self.mask is not None else None
        per_task = []
        for t, (task, (x, y)) in enumerate(zip(ctx.tasks, batches)):
            if current is None:
                per_task.append(task_scores(ctx.model, t, task, x, y, self.estimator, chunk_size=self.chunk_size))
            else:
                per_task.append(
                    masked_network_scores(ctx.model, t, task, x, y, current[t], self.estimator, self.chunk_size)
                )
        scores = [torch.stack(s) for s in zip(*per_task)]
        return (
            per_layer_topk(scores, self.keep_ratio) if self.per_layer else fk.topk_mask_batched(scores, self.keep_ratio)
        )


class FisherSparseInTurns(FisherSparseVariant):
    """FS with the tasks updated in turns: T optimizer updates per step (see the module docstring)."""

    in_turns = True

    def __init__(self, keep_ratio, **kwargs) -> None:
        super().__init__(keep_ratio, **kwargs)
        self._turn_masks: tuple[fk.PackedMask, list[list[torch.Tensor]]] | None = None  # (mask, per task)

    def backward_task(self, t: int, loss: torch.Tensor) -> None:
        mask = self.mask
        if mask is not None and (self._turn_masks is None or self._turn_masks[0] is not mask):
            self._turn_masks = (mask, task_masks(mask))
        task_backward(self.context.model, t, loss, None if mask is None else self._turn_masks[1][t])


class EqualWeightingInTurns(EqualWeighting):
    """Dense MTL with the tasks updated in turns: each task's full gradient, one update per task."""

    in_turns = True

    def backward_task(self, t: int, loss: torch.Tensor) -> None:
        task_backward(self.context.model, t, loss, None)


def _equal_in_turns(options) -> EqualWeightingInTurns:
    return EqualWeightingInTurns()


METHODS = (
    Method("rs-redraw", "RS-redraw", partial(_random_sparse, True), RandomSparse, variant="redraw", sparse=True),
    Method("fs-layer", "FS-layer", partial(_fisher_sparse, "fs", cls=FisherSparseVariant, per_layer=True),
           FisherSparseVariant, variant="per_layer", sparse=True),
    Method("fs-masked", "FS-masked", partial(_fisher_sparse, "fs", cls=FisherSparseVariant, masked_fisher=True),
           FisherSparseVariant, variant="masked_fisher", sparse=True),
    Method("fs-avg", "FS-avg", partial(_fisher_sparse, "fs", cls=FisherSparseVariant, update="average"),
           FisherSparseVariant, variant="average", sparse=True),
    Method("fs-turns", "FS-turns", partial(_fisher_sparse, "fs", cls=FisherSparseInTurns), FisherSparseInTurns,
           variant="in_turns", sparse=True),
    Method("mtl-turns", "MTL-turns", _equal_in_turns, EqualWeightingInTurns, variant="in_turns"),
    Method("stl-fs", "STL-FS", partial(_fisher_sparse, "fs", cls=FisherSparseVariant, update="average"),
           FisherSparseVariant, variant="stl", sparse=True, single_task=True),
)  # fmt: skip
