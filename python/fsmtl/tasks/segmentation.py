"""Semantic segmentation: per-pixel classes, mIoU and pixel accuracy.

The confusion matrix is built with ``torch.bincount`` instead of ``sklearn.metrics.confusion_matrix``:
a Cityscapes test set has ~16 M labelled pixels and bincount counts them in one pass without
copying to a sparse matrix; the tests check it equals scikit-learn's.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .kind import TaskKind


class Segmentation(TaskKind):
    """Targets ``[n, H, W]`` int64 in [0, C) or -1 (ignored); outputs logits ``[n, C, H, W]``;
    pixel cross-entropy, per sample the mean over its labelled pixels."""

    name = "segmentation"
    metrics = {"miou": True, "pix_acc": True}
    primary_metric = "miou"
    target_dtype = torch.int64
    target_dims = 3
    single_output = False
    dense = True

    def per_sample_loss(self, outputs, targets):
        pix = F.cross_entropy(outputs, targets, ignore_index=-1, reduction="none")
        valid = (targets != -1).flatten(1)
        return pix.flatten(1).sum(1) / valid.sum(1).clamp_min(1)

    def mean_loss(self, outputs, targets):
        pix = F.cross_entropy(outputs, targets, ignore_index=-1, reduction="none")
        return pix.flatten().sum() / (targets != -1).sum().clamp_min(1)

    def probabilities(self, task, outputs):
        """Softmax over the C classes at every pixel, ``[n, C, H, W]``."""
        return torch.softmax(outputs, dim=1)

    def labels(self, task, outputs):
        """The most likely class of every pixel, ``[n, H, W]``."""
        return outputs.argmax(dim=1)

    def metric_inputs(self, task, outputs, targets):
        n = targets.shape[0]
        if outputs.dim() != 4 or outputs.shape[1] != task.num_outputs or targets.shape != (n, *outputs.shape[2:]):
            raise ValueError(
                f"segmentation task {task.name!r}: outputs must be [n, {task.num_outputs}, H, W] logits "
                f"and targets [n, H, W], got {tuple(outputs.shape)} and {tuple(targets.shape)}"
            )
        return outputs, targets

    def compute_metrics(self, task, outputs, targets):
        return segmentation_scores(segmentation_confusion(outputs, targets.to(torch.int64), task.num_outputs))


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


KIND = Segmentation()
