"""Multi-label classification: ``k`` independent binary attributes per sample in one task (a
group of CelebA attributes sharing one head, as in the maximum-roaming CelebA harness)."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from ._classification import METRICS
from .kind import TaskKind


class MultiLabel(TaskKind):
    """Targets ``[n, k]`` float32 in {0, 1}; outputs ``[n, k]`` logits; loss: BCE averaged over the
    ``k`` attributes. Metrics: each binary metric of the positive class per attribute, then the
    mean over the attributes (accuracy is per attribute, not exact-match). Fisher scores use the
    squared per-sample loss gradient (no single class distribution)."""

    name = "multilabel"
    metrics = METRICS
    primary_metric = "f1"
    target_dtype = torch.float32
    target_dims = 2
    single_output = False

    def per_sample_loss(self, outputs, targets):
        return F.binary_cross_entropy_with_logits(outputs, targets.float(), reduction="none").mean(1)

    def probabilities(self, task, outputs):
        """P(attribute present) per attribute, ``[n, k]``."""
        return torch.sigmoid(outputs)

    def labels(self, task, outputs):
        """1 where an attribute's logit is positive, ``[n, k]``."""
        return (outputs > 0).long()

    def metric_inputs(self, task, outputs, targets):
        if outputs.shape != targets.shape or outputs.dim() != 2:
            raise ValueError(
                f"multilabel task {task.name!r}: outputs and targets must both be [n, k], "
                f"got {tuple(outputs.shape)} and {tuple(targets.shape)}"
            )
        return outputs, targets

    def compute_metrics(self, task, outputs, targets):
        y_true = targets.numpy().astype(np.int64)
        if not np.isin(y_true, (0, 1)).all():
            raise ValueError(f"multilabel task {task.name!r}: targets must be 0 or 1")
        y_pred = (outputs > 0).numpy().astype(np.int64)
        tp = (y_pred & y_true).sum(0)
        predicted, actual = y_pred.sum(0), y_true.sum(0)
        precision = np.divide(tp, predicted, out=np.zeros(len(tp)), where=predicted > 0)
        recall = np.divide(tp, actual, out=np.zeros(len(tp)), where=actual > 0)
        denom = precision + recall
        f1 = np.divide(2 * precision * recall, denom, out=np.zeros(len(tp)), where=denom > 0)
        return {
            "accuracy": float((y_pred == y_true).mean()),
            "precision": float(precision.mean()),
            "recall": float(recall.mean()),
            "f1": float(f1.mean()),
        }


KIND = MultiLabel()
