"""Per-task metrics, their average over tasks, and the average rank of methods (paper Tables 1-2).

Each task kind (:mod:`fsmtl.tasks`) defines its metrics: classification from scikit-learn
(``accuracy_score``, ``precision_recall_fscore_support``), regression from ``mean_squared_error`` /
``mean_absolute_error``, segmentation from a ``torch.bincount`` confusion matrix, depth as in
MTAN / LibMTL.

All metrics are plain fractions (0.93, not 93 %); the paper prints mIoU and pixel accuracy in percent.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch
from scipy.stats import rankdata

from .depth import depth_errors
from .registry import METRIC_DIRECTION, TASK_KINDS
from .segmentation import segmentation_confusion, segmentation_scores
from .task import Task

__all__ = [
    "METRIC_DIRECTION",
    "average_metrics",
    "average_rank",
    "primary_score",
    "depth_errors",
    "segmentation_confusion",
    "segmentation_scores",
    "task_metrics",
]


def task_metrics(task: Task, outputs: torch.Tensor, targets: torch.Tensor) -> dict[str, float]:
    """Metrics of one task on one split.

    Args:
        task: the task; its kind decides the metrics (``TASK_KINDS[task.kind].metrics``).
        outputs: model outputs: binary logits ``[n]`` (or ``[n, 1]``; positive when > 0), multiclass
            logits ``[n, C]``, regression predictions ``[n]``, segmentation logits ``[n, C, H, W]``,
            depth predictions ``[n, 1, H, W]``.
        targets: as in :class:`fsmtl.data.Split`.

    Returns:
        binary: accuracy, precision, recall, f1 of the positive class (0 when undefined);
        multiclass: accuracy and macro precision, recall, f1 over the classes present in targets or
        predictions; regression: mse, mae; segmentation: miou, pix_acc (pixels labelled -1 ignored);
        depth: abs_err, rel_err over pixels with target != 0.
    """
    if not isinstance(task, Task):
        raise TypeError(f"task must be a fsmtl.Task, got {type(task).__name__}")
    if not isinstance(outputs, torch.Tensor) or not isinstance(targets, torch.Tensor):
        raise TypeError("outputs and targets must be torch.Tensor")
    outputs, targets = outputs.detach().cpu(), targets.detach().cpu()
    n = targets.shape[0] if targets.dim() > 0 else -1
    if n < 1 or outputs.shape[:1] != (n,):
        raise ValueError(f"outputs {tuple(outputs.shape)} and targets {tuple(targets.shape)} need the same n >= 1")
    kind = TASK_KINDS[task.kind]
    outputs, targets = kind.metric_inputs(task, outputs, targets)
    if outputs.is_floating_point() and not torch.isfinite(outputs).all():
        raise ValueError(f"task {task.name!r}: outputs contain NaN or inf")
    return kind.compute_metrics(task, outputs, targets)


def average_metrics(per_task: Sequence[Mapping[str, float]]) -> dict[str, float]:
    """Mean over tasks of each metric present in every task's dict (in the first dict's order).

    E.g. a benchmark of a segmentation and a depth task has no metric in common and gives ``{}``.
    """
    if len(per_task) == 0:
        raise ValueError("per_task must hold at least one task's metrics")
    common = [name for name in per_task[0] if all(name in m for m in per_task)]
    return {name: float(np.mean([float(m[name]) for m in per_task])) for name in common}


def average_rank(results: Mapping[str, Mapping[str, float]], metrics: Sequence[str] | None = None) -> dict[str, float]:
    """Mean rank of each method over metrics, as the "Avg Rank" column of the paper's Tables 1-2.

    For each metric the methods are ranked 1 (best) to M, in the direction of
    :data:`METRIC_DIRECTION`; tied values share the average of their ranks (two methods tied for
    best both get 1.5). A method's score is the mean of its ranks over the metrics.

    Args:
        results: method -> {metric -> value} (e.g. :func:`average_metrics` of each method). Pass
            only the methods to rank; the paper leaves STL out of its ranking.
        metrics: the metrics to rank on; default all metrics of :data:`METRIC_DIRECTION` present
            for every method (other keys, such as a keep ratio, are ignored).

    Returns:
        method -> average rank (float), in the order of ``results``.
    """
    if len(results) == 0:
        raise ValueError("results must hold at least one method")
    methods = list(results)
    if metrics is None:
        metrics = [m for m in results[methods[0]] if m in METRIC_DIRECTION and all(m in results[k] for k in methods)]
        if not metrics:
            raise ValueError(
                f"results have no metric of METRIC_DIRECTION common to all methods: {sorted(METRIC_DIRECTION)}"
            )
    else:
        metrics = list(metrics)
        if not metrics:
            raise ValueError("metrics must not be empty")
        for m in metrics:
            if m not in METRIC_DIRECTION:
                raise ValueError(f"metric {m!r} has no direction in METRIC_DIRECTION")
            missing = [k for k in methods if m not in results[k]]
            if missing:
                raise ValueError(f"metric {m!r} is missing for method(s) {missing}")
    ranks = np.zeros(len(methods))
    for m in metrics:
        values = np.array([float(results[k][m]) for k in methods])
        if not np.isfinite(values).all():
            raise ValueError(f"metric {m!r} has a NaN or inf value")
        # rankdata ranks ascending; negate where higher is better so rank 1 is the best method.
        ranks += rankdata(-values if METRIC_DIRECTION[m] else values, method="average")
    return {k: float(r / len(metrics)) for k, r in zip(methods, ranks, strict=True)}


def primary_score(tasks: Sequence[Task], per_task: Sequence[Mapping[str, float]]) -> float:
    """Mean over tasks of each task kind's primary metric, signed so that higher is better: the
    score that chooses hyper-parameters and the best epoch on validation."""
    scores = []
    for task, metrics in zip(tasks, per_task):
        name = TASK_KINDS[task.kind].primary_metric
        scores.append(metrics[name] if METRIC_DIRECTION[name] else -metrics[name])
    return sum(scores) / len(scores)
