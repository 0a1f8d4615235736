"""FS / EFS: masks from the top-K Fisher information of each task (paper Eq. 9-11, Algorithm 2),
and the parameter update of the paper's Algorithm 1.

The update (Section "Optimization and Implementation Detail", Eq. 12): "In homogeneous features
MTL, the multi-task datasets are fed to the network, and the tasks' objective are optimized in
turns. In heterogeneous features MTL [...] the average of all tasks gradients is taken as the
final gradient". So by default (``update="paper"``) FS updates the tasks in turns when they share
one input (within a step, task 1's masked gradient ``S_1 * g_1`` makes one optimizer update, then
task 2's loss is recomputed on the updated parameters and makes the next, and so on: T updates per
step), and takes one update with the average ``sum_t S_t g_t / T`` when each task has its own
inputs. ``update="average"`` always takes the average (method ``fs-avg``), ``update="turns"``
always updates in turns (method ``fs-turns``).
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial

import torch

import fsmtl_kernels as fk

from ...estimators import ESTIMATORS
from ...gradients.sharded import sharded_task_backward
from ..method import Method
from .base import SparseStrategy


class FisherSparse(SparseStrategy):
    """Fisher sparse multi-task learning.

    At every mask update, each task draws ``samples`` training examples, scores the masked
    trunk entries with ``estimator`` (``fs`` Eq. 10, ``efs`` Eq. 9, ``grad2``/``absgrad``
    Algorithm 2) on the dense trunk, and keeps its top ``keep_ratio`` entries
    (:func:`fsmtl_kernels.topk_mask_batched`, exact k, ties by position).

    ``update``: ``"paper"`` (default) updates the tasks in turns on a homogeneous benchmark and
    with the averaged masked gradient on a heterogeneous one (see the module docstring);
    ``"average"`` and ``"turns"`` force one of the two. The Trainer says whether the tasks share
    their inputs through the bound context's ``homogeneous``; a context that does not say (and an
    unbound strategy) counts as homogeneous, the common case.

    Other arguments as :class:`~fsmtl.strategies.sparse.base.SparseStrategy`.
    """

    def __init__(
        self,
        keep_ratio: float | int,
        *,
        estimator: str = "fs",
        samples: int = 256,
        chunk_size: int = 32,
        update: str = "paper",
        **kwargs,
    ) -> None:
        if update not in UPDATES:
            raise ValueError(f"update must be one of {UPDATES}, got {update!r}")
        if estimator not in ESTIMATORS:
            raise ValueError(f"estimator must be one of {tuple(ESTIMATORS)}, got {estimator!r}")
        if isinstance(samples, bool) or not isinstance(samples, int) or samples < 1:
            raise ValueError(f"samples must be a positive int, got {samples!r}")
        super().__init__(keep_ratio, **kwargs)
        self.estimator = estimator
        self.samples = samples
        self.chunk_size = chunk_size
        self.update = update
        self._turn_masks: tuple[fk.PackedMask, list[list[torch.Tensor]]] | None = None  # (mask, per task)

    @property
    def in_turns(self) -> bool:
        """True when each step updates the tasks in turns (see ``update``)."""
        if self.update != "paper":
            return self.update == "turns"
        context = self.__dict__.get("_context")
        return context is None or context.homogeneous

    def backward_task(self, t: int, loss: torch.Tensor) -> None:
        """Task ``t``'s own update in turns: ``S_t * g_t`` on the masked trunk (``g_t`` before the
        first mask), ``g_t`` on the densely shared parameters and on head t."""
        mask = self.mask
        if mask is not None and (self._turn_masks is None or self._turn_masks[0] is not mask):
            stacked = mask.to_bool_stacked()
            self._turn_masks = (mask, [[m[k] for m in stacked] for k in range(mask.num_tasks)])
        task_backward(self.context.model, t, loss, None if mask is None else self._turn_masks[1][t])

    def fsmtl_options(self) -> dict:
        return {"estimator": self.estimator, "samples": self.samples, "chunk_size": self.chunk_size}

    def compute_mask(self) -> fk.PackedMask:
        return self.fsmtl.fisher_masks(self.context.sample)


#: The parameter updates of :class:`FisherSparse` (``update``).
UPDATES = ("paper", "average", "turns")


def task_backward(model, t: int, loss: torch.Tensor, mask: Sequence[torch.Tensor] | None) -> None:
    """Write ``.grad`` for one task's update: ``S_t * g_t`` on the masked trunk parameters (``g_t``
    without a mask), ``g_t`` on the densely shared ones and on head t; other heads get no gradient.
    A model sharded with FSDP2 takes :func:`fsmtl.gradients.sharded.sharded_task_backward`."""
    if model.is_sharded:  # FSDP2: a plain backward, then each rank masks its reduced shards
        sharded_task_backward(model, loss, mask)
        return
    masked = model.masked_parameters()
    dense = model.dense_shared_parameters()
    head = [p for p in model.heads[t].parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss, [*masked, *dense, *head], allow_unused=True)
    for i, (p, g) in enumerate(zip([*masked, *dense, *head], grads)):
        if g is None:
            g = torch.zeros_like(p)
        if mask is not None and i < len(masked):
            g = torch.where(mask[i], g, 0.0)
        p.grad = g


def _fisher_sparse(estimator: str, options, cls: type[FisherSparse] = FisherSparse, **choices) -> FisherSparse:
    """A ``cls`` (FisherSparse or a variant) with ``estimator`` and the run's options."""
    return cls(
        options.keep_ratio,
        estimator=estimator,
        samples=options.samples,
        schedule=options.schedule,
        mask_forward=options.mask_forward,
        normalize=options.normalize,
        **choices,
    )


# One method per score estimator: FS, EFS, GRAD2 and ABSGRAD are FisherSparse with another score,
# each with the paper's update (in turns on homogeneous tasks).
METHODS = tuple(
    Method(name, est.label, partial(_fisher_sparse, name), FisherSparse, variant=name, sparse=True)
    for name, est in ESTIMATORS.items()
)
