"""Per-task metrics, their average over tasks, and the average rank of methods (paper Tables 1-2).

Classification metrics come from scikit-learn (``accuracy_score``, ``precision_recall_fscore_support``),
regression from ``mean_squared_error`` / ``mean_absolute_error``. Segmentation builds its confusion
matrix with ``torch.bincount`` instead of ``sklearn.metrics.confusion_matrix``: a Cityscapes test set
has ~16 M labelled pixels and bincount counts them in one pass without copying to a sparse matrix;
the tests check it equals scikit-learn's. Depth follows MTAN / LibMTL exactly.

All metrics are plain fractions (0.93, not 93 %); the paper prints mIoU and pixel accuracy in percent.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch
from scipy.stats import rankdata
from sklearn.metrics import accuracy_score, mean_absolute_error, mean_squared_error, precision_recall_fscore_support

from .data import Task

# Metric name -> True when higher is better.
METRIC_DIRECTION: dict[str, bool] = {
    "accuracy": True,
    "precision": True,
    "recall": True,
    "f1": True,
    "mse": False,
    "mae": False,
    "miou": True,
    "pix_acc": True,
    "abs_err": False,
    "rel_err": False,
}

# Metric names each task kind produces, in order.
KIND_METRICS: dict[str, tuple[str, ...]] = {
    "binary": ("accuracy", "precision", "recall", "f1"),
    "multiclass": ("accuracy", "precision", "recall", "f1"),
    "regression": ("mse", "mae"),
    "segmentation": ("miou", "pix_acc"),
    "depth": ("abs_err", "rel_err"),
}


def _check_shapes(task: Task, outputs: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Validate ``outputs``/``targets`` for ``task`` and return them detached on the CPU."""
    if not isinstance(task, Task):
        raise TypeError(f"task must be a fsmtl.data.Task, got {type(task).__name__}")
    if not isinstance(outputs, torch.Tensor) or not isinstance(targets, torch.Tensor):
        raise TypeError("outputs and targets must be torch.Tensor")
    outputs, targets = outputs.detach().cpu(), targets.detach().cpu()
    n = targets.shape[0] if targets.dim() > 0 else -1
    if n < 1 or outputs.shape[:1] != (n,):
        raise ValueError(f"outputs {tuple(outputs.shape)} and targets {tuple(targets.shape)} need the same n >= 1")
    kind = task.kind
    if kind in ("binary", "regression"):
        if outputs.dim() == 2 and outputs.shape[1] == 1:
            outputs = outputs[:, 0]
        if outputs.dim() != 1 or targets.dim() != 1:
            raise ValueError(
                f"{kind} task {task.name!r}: outputs must be [n] (or [n, 1]) and targets [n], "
                f"got {tuple(outputs.shape)} and {tuple(targets.shape)}"
            )
    elif kind == "multiclass":
        if outputs.shape != (n, task.num_outputs) or targets.dim() != 1:
            raise ValueError(
                f"multiclass task {task.name!r}: outputs must be [n, {task.num_outputs}] logits and "
                f"targets [n], got {tuple(outputs.shape)} and {tuple(targets.shape)}"
            )
    elif kind == "segmentation":
        if outputs.dim() != 4 or outputs.shape[1] != task.num_outputs or targets.shape != (n, *outputs.shape[2:]):
            raise ValueError(
                f"segmentation task {task.name!r}: outputs must be [n, {task.num_outputs}, H, W] logits "
                f"and targets [n, H, W], got {tuple(outputs.shape)} and {tuple(targets.shape)}"
            )
    else:  # depth
        if outputs.dim() != 4 or outputs.shape[1] != 1 or targets.shape != outputs.shape:
            raise ValueError(
                f"depth task {task.name!r}: outputs and targets must both be [n, 1, H, W], "
                f"got {tuple(outputs.shape)} and {tuple(targets.shape)}"
            )
    if outputs.is_floating_point() and not torch.isfinite(outputs).all():
        raise ValueError(f"task {task.name!r}: outputs contain NaN or inf")
    return outputs, targets


def _classification(y_true: np.ndarray, y_pred: np.ndarray, average: str) -> dict[str, float]:
    precision, recall, f1, _ = precision_recall_fscore_support(y_true, y_pred, average=average, zero_division=0)
    return {
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "precision": float(precision),
        "recall": float(recall),
        "f1": float(f1),
    }


def segmentation_confusion(logits: torch.Tensor, targets: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Confusion matrix ``[C, C]`` int64 (rows = true class, columns = predicted) over pixels whose target is not -1.

    ``logits`` ``[n, C, H, W]`` float, ``targets`` ``[n, H, W]`` int64 in [0, C) or -1. Sum these
    over batches to evaluate a data set that does not fit in memory at once.
    """
    pred = logits.argmax(dim=1)
    valid = targets != -1
    truth = targets[valid]
    if truth.numel() and (truth.min() < 0 or truth.max() >= num_classes):
        raise ValueError(
            f"segmentation targets must be -1 or in [0, {num_classes}), "
            f"got values in [{int(truth.min())}, {int(truth.max())}]"
        )
    flat = truth * num_classes + pred[valid]
    return torch.bincount(flat, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def segmentation_scores(confusion: torch.Tensor) -> dict[str, float]:
    """mIoU and pixel accuracy from a confusion matrix ``[C, C]``.

    IoU_c = TP / (TP + FP + FN); mIoU averages it over the classes that occur in the targets or the
    predictions (a class absent from both has no IoU and is skipped, where LibMTL's plain mean would
    give NaN). Pixel accuracy = correctly labelled / labelled pixels.
    """
    h = confusion.to(torch.float64)
    tp = torch.diag(h)
    union = h.sum(0) + h.sum(1) - tp
    present = union > 0
    total = h.sum()
    if total == 0:
        raise ValueError("segmentation targets have no labelled pixel (all -1)")
    return {"miou": float((tp[present] / union[present]).mean()), "pix_acc": float(tp.sum() / total)}


def depth_errors(predictions: torch.Tensor, targets: torch.Tensor) -> dict[str, float]:
    """MTAN / LibMTL depth errors over valid pixels (target != 0).

    ``abs_err`` = mean |pred - true|, ``rel_err`` = mean |pred - true| / true, both averaged over all
    valid pixels of the set (not per image). ``predictions`` and ``targets`` ``[n, 1, H, W]`` float.
    """
    valid = targets != 0
    count = int(valid.sum())
    if count == 0:
        raise ValueError("depth targets have no valid pixel (all 0)")
    pred, true = predictions[valid].to(torch.float64), targets[valid].to(torch.float64)
    err = (pred - true).abs()
    return {"abs_err": float(err.sum() / count), "rel_err": float((err / true.abs()).sum() / count)}


def task_metrics(task: Task, outputs: torch.Tensor, targets: torch.Tensor) -> dict[str, float]:
    """Metrics of one task on one split.

    Args:
        task: the task; its kind decides the metrics (:data:`KIND_METRICS`).
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
    outputs, targets = _check_shapes(task, outputs, targets)
    if task.kind == "binary":
        y_true = targets.numpy().astype(np.int64)
        if not np.isin(y_true, (0, 1)).all():
            raise ValueError(f"binary task {task.name!r}: targets must be 0 or 1")
        return _classification(y_true, (outputs > 0).numpy().astype(np.int64), "binary")
    if task.kind == "multiclass":
        return _classification(targets.numpy(), outputs.argmax(dim=1).numpy(), "macro")
    if task.kind == "regression":
        y_true, y_pred = targets.to(torch.float64).numpy(), outputs.to(torch.float64).numpy()
        return {"mse": float(mean_squared_error(y_true, y_pred)), "mae": float(mean_absolute_error(y_true, y_pred))}
    if task.kind == "segmentation":
        return segmentation_scores(segmentation_confusion(outputs, targets.to(torch.int64), task.num_outputs))
    return depth_errors(outputs, targets)


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
