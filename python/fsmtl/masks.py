"""Each task's top-K mask over the masked trunk parameters from its own batch of examples
(:func:`compute_masks`), for the sparse strategies and for any training loop; on several ranks the
scores are summed with one all-reduce first, so every rank takes the same masks."""

from __future__ import annotations

from collections.abc import Sequence

import torch

import fsmtl_kernels as fk

from .collectives import reduce_scores
from .estimators import task_scores
from .model import MultiTaskModel
from .tasks import Task
from .tasks.checks import check_batch


def compute_masks(
    model: MultiTaskModel,
    tasks: Sequence[Task],
    batches: Sequence[tuple[torch.Tensor, torch.Tensor]],
    keep_ratio: float | int,
    *,
    estimator: str = "fs",
    chunk_size: int = 32,
) -> fk.PackedMask:
    """Each task's top-``keep_ratio`` trunk entries by ``estimator`` score (Algorithm 2).

    Args:
        model: the multi-task model (its dense trunk is scored).
        tasks: the T tasks, in head order.
        batches: one ``(inputs, targets)`` pair per task, e.g. N sampled training examples.
        keep_ratio: float in ``(0, 1]`` or int count of kept entries per task.
        estimator: ``fs``, ``efs``, ``grad2`` or ``absgrad`` (see :mod:`fsmtl.estimators`).

    Returns:
        A :class:`fsmtl_kernels.PackedMask` with T tasks over ``model.masked_parameters()``.
    """
    if len(tasks) != model.num_tasks or len(batches) != model.num_tasks:
        raise ValueError(
            f"tasks ({len(tasks)}) and batches ({len(batches)}) must have one entry per head ({model.num_tasks})"
        )
    fk.check_k(keep_ratio, "keep_ratio")
    if keep_ratio <= 0:
        raise ValueError(f"keep_ratio must be > 0, got {keep_ratio!r}")
    for t, (task, batch) in enumerate(zip(tasks, batches)):
        if not isinstance(batch, (tuple, list)) or len(batch) != 2:
            raise TypeError(f"compute_masks: batches[{t}] (task {task.name!r}) must be an (inputs, targets) pair")
    # Lengths, empty data, target dtype/shape/range and NaN, per task, before any scoring.
    check_batch(tasks, [b[0] for b in batches], [b[1] for b in batches], "compute_masks batches")
    per_task = [
        task_scores(model, t, task, x, y, estimator, chunk_size=chunk_size)
        for t, (task, (x, y)) in enumerate(zip(tasks, batches))
    ]
    # Several ranks (each scored its share of the samples): one all-reduce of the weighted scores.
    per_task = reduce_scores(per_task, [b[0].shape[0] for b in batches])
    return fk.topk_mask_batched([torch.stack(s) for s in zip(*per_task)], keep_ratio)
